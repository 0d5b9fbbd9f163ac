"""Per-device memory of sharded training and of the Taylor pass, from XLA, without the hardware.

Issue 29, item 5. The recovery trainer's step (`recovery.trainer.build_steps`: distillation, LoRA
or continued pretraining, AdamW, the channel-space sharding rules of `recovery.sharding`) and
LLM-Pruner's first-order Taylor pass (`calibration.gradients`: the gradient of the mean
next-token cross-entropy w.r.t. every decoder-layer kernel, float32) are traced on an abstract
model (`nnx.eval_shape`: `ShapeDtypeStruct`s, no weight is materialized), lowered with the
mesh's shardings and compiled; XLA's `compiled.memory_analysis()` then gives each device's
argument, output, alias, temporary and generated-code bytes. The per-device peak is
`argument + output - alias + temp` (donated state is aliased to the outputs).

Forced host CPU devices stand in for the mesh (`--xla_force_host_platform_device_count=N`, set
before JAX starts, so `plan_in_child` runs this module in a child process). XLA's CPU backend
partitions the program exactly as for GPU or TPU, but its fusion and scheduling differ, so the
temporaries are the CPU compiler's (the arguments and outputs, which dominate, are exact).

A model of many identical layers is compiled with `layers` decoder layers (1 and 2 by default)
and every byte count extrapolated linearly to the full depth (`a + b * L`); the benchmark
(`benchmarks/distributed_plan.py`) checks the extrapolation against a compile of more layers.

Example:
    >>> plan_in_child(config, recovery_cfg, devices=8)          # {"bytes_per_device": ..., ...}
    python -m nnxprune.plan_distributed SPEC.json               # what the child runs
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")


def _analysis(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    out = {f.replace("_size_in_bytes", ""): int(getattr(stats, f, 0) or 0) for f in FIELDS}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _abstract(config, cfg, *, masks: bool):
    """The abstract model (LoRA adapters added for kind 'lora', bool masks on every decoder
    projection with `masks`) and its abstract AdamW optimizer."""
    import jax.numpy as jnp
    from flax import nnx

    from nnxprune.layers import Linear
    from nnxprune.models.llama import Llama
    from nnxprune.recovery import lora as lora_lib
    from nnxprune.recovery.trainer import make_tx

    wrt = nnx.LoRAParam if cfg.kind == "lora" else nnx.Param

    def build():
        model = Llama(config, rngs=nnx.Rngs(0))
        if masks:
            for path, node in nnx.iter_modules(model):
                if isinstance(node, Linear) and path and path[0] == "layers":
                    node.set_mask(jnp.ones(node.kernel.shape, bool))
        if cfg.kind == "lora":
            lora_lib.add_lora(model, cfg.lora, seed=cfg.seed)
        return model, nnx.Optimizer(model, make_tx(cfg), wrt=wrt)

    model, optimizer = nnx.eval_shape(build)
    return model, optimizer, wrt


def train_step_memory(config, cfg, mesh, *, masks: bool = False) -> dict[str, int]:
    """XLA's per-device memory of one recovery step of `cfg` on `config`, split, sharded and
    jitted by the trainer's own `_shardings` and `_jit_steps` (the teacher of a distillation:
    the same config, frozen)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nnxprune.models.llama import Llama
    from nnxprune.recovery.losses import strategy_for
    from nnxprune.recovery.trainer import _jit_steps, _shardings

    strategy = strategy_for(cfg)
    model, optimizer, wrt = _abstract(config, cfg, masks=masks)
    teacher = (nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
               if strategy.needs_teacher else None)
    layout = _shardings(model, optimizer, wrt, mesh, teacher)  # as the trainer places the state
    parts = layout.parts
    # LoRA dropout keys are closed over by the step: a few bytes each, made concrete
    parts.keys = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), parts.keys)
    train_jit, _ = _jit_steps(layout, strategy, cfg, mesh)
    batch = jax.ShapeDtypeStruct((cfg.grad_accum, cfg.micro_batch, cfg.seqlen), jnp.int32)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else mesh:
        compiled = train_jit.lower(parts.trainable, layout.opt_state, parts.const,
                                   layout.teacher_state, batch, step).compile()
    return _analysis(compiled)


def taylor_memory(config, mesh, *, nsamples: int, seqlen: int) -> dict[str, int]:
    """XLA's per-device memory of the first-order Taylor pass (`calibration.gradients`: the
    float32 model, the gradient of every decoder-layer kernel) on `nsamples x seqlen` tokens,
    the model sharded by the recovery rules and the rows over the batch axes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nnxprune.calibration.gradients import _is_layer_kernel, _loss
    from nnxprune.models.llama import Llama
    from nnxprune.recovery import sharding as sh

    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, kernels, rest = nnx.split(model, _is_layer_kernel, ...)
    specs = sh.param_specs(model, mesh)
    k_sh = sh.state_shardings(kernels, specs, mesh)
    r_sh = sh.state_shardings(rest, specs, mesh)
    tokens = jax.ShapeDtypeStruct((nsamples, seqlen), jnp.int32)

    def value_and_grad(kernels, rest, tokens):
        return jax.value_and_grad(_loss, argnums=1)(graphdef, kernels, rest, tokens)

    jitted = jax.jit(value_and_grad, in_shardings=(k_sh, r_sh, sh.batch_sharding(mesh, 2)),
                     out_shardings=(sh.replicated(mesh), k_sh))
    compiled = jitted.lower(kernels, rest, tokens).compile()
    return _analysis(compiled)


def _with_layers(config, n: int):
    return dataclasses.replace(config, layers=config.layers[:1] * n)


def extrapolated(measure, config, *, layers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """`measure(config)` at each depth in `layers` (the first layer's shape repeated), every
    byte count fitted as `a + b * L` through the first two and taken at the config's depth."""
    got = {n: measure(_with_layers(config, n)) for n in layers}
    lo, hi = layers[0], layers[1]
    full = config.num_layers
    out = {k: int(got[lo][k] + (got[hi][k] - got[lo][k]) * (full - lo) / (hi - lo))
           for k in got[lo]}
    return {"bytes": out, "measured_layers": {str(n): got[n] for n in layers},
            "method": f"compiled with {', '.join(map(str, layers))} decoder layers; each byte "
                      f"count extrapolated linearly to {full} layers"}


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """What the child computes: `spec` names the config (`config`, a `LlamaConfig.to_dict`), the
    mesh sizes, the step (`train` with a `recovery` table, or `taylor` with nsamples/seqlen),
    `layers` to compile and `masks`."""
    from nnxprune.models.llama import LlamaConfig
    from nnxprune.recovery import sharding as sh
    from nnxprune.recovery.config import RecoveryConfig

    config = LlamaConfig.from_dict(spec["config"])
    mesh = sh.make_mesh(spec["mesh"])
    if spec["step"] == "taylor":
        def measure(c):
            return taylor_memory(c, mesh, nsamples=spec["nsamples"], seqlen=spec["seqlen"])
    else:
        cfg = RecoveryConfig.from_dict(spec["recovery"])

        def measure(c):
            return train_step_memory(c, cfg, mesh, masks=spec.get("masks", False))
    layers = tuple(spec.get("layers") or ())
    if not layers:
        return {"bytes": measure(config), "method": f"compiled with all {config.num_layers} layers"}
    return extrapolated(measure, config, layers=layers)


def plan_in_child(spec: dict[str, Any], *, timeout: float = 1800) -> dict[str, Any]:
    """`run_spec(spec)` in a child process with `prod(spec["mesh"])` forced host CPU devices.
    A failure is a RuntimeError with the child's last lines."""
    import math
    import tempfile

    devices = math.prod(spec["mesh"].values())
    # XLA's default pipeline (DESIGN principle 14): only the device count is forced
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        proc = subprocess.run([sys.executable, "-m", "nnxprune.plan_distributed", path],
                              capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"memory plan failed: {(proc.stderr or proc.stdout)[-800:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    print(json.dumps(run_spec(spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
