"""What `nnxprune prune RECIPE --check` says about memory: the run's predicted peak, whether it
fits, and settings that would (issue 28, item 6; issue 29, item 5).

The recipe's steps, calibration and evaluation settings are turned into an `nnxprune.plan`
prediction for the run as configured (in memory, or `--stream`, in `--dtype`), compared with the
memory the run may use (`--memory-budget GB`, else `NNXPRUNE_MEMORY_BUDGET_GB`, else what this
machine has available). When it does not fit, the alternatives are predicted too (bf16 weights,
`--stream`, fewer calibration samples) and the ones that fit are printed. A recipe with
`[recovery]` also gets the training step's per-device bytes on its configured mesh, from XLA's
memory analysis of the step compiled abstractly (`nnxprune.plan_distributed`; seconds to a few
minutes, skipped with `NNXPRUNE_CHECK_NO_COMPILE=1`).

Example:
    >>> check_memory(recipe, config, model="folder/with/config.json", stream=False,
    ...              dtype="float32", budget_gb=24)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from nnxprune import plan

SPARSITY = ("magnitude", "wanda", "sparsegpt", "owl", "sparsellm")


def input_dtype_of(model: str) -> str:
    """The dtype MODEL's weights are stored in, read without them: an HF folder's config.json
    (`torch_dtype` / `dtype`), a checkpoint's nnxprune.json, float32 for GGUF (what it
    dequantizes to) and whatever cannot be told."""
    path = Path(model)
    try:
        if path.is_dir() and (path / "nnxprune.json").is_file():
            name = json.loads((path / "nnxprune.json").read_text()).get("param_dtype", "float32")
        elif path.is_dir() and (path / "config.json").is_file():
            hf = json.loads((path / "config.json").read_text())
            name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        else:
            name = "float32"
    except (OSError, ValueError):
        name = "float32"
    return str(name) if str(name) in plan.DTYPE_BYTES else "float32"


def _method(step) -> str | None:
    kind = getattr(step, "kind", None)
    if kind in plan.STREAMED:
        return kind
    return "width" if kind in ("shrink_mlp", "remove_query_heads", "remove_kv_groups",
                               "shrink_hidden", "llm_pruner", "wanda_sp", "flap") else None


def run_plan(recipe, config, *, stream: bool, dtype: str, input_dtype: str,
             nsamples: int | None = None) -> plan.MemoryPlan:
    """The plan of `recipe` on `config` run as configured (`nsamples` overrides calibration)."""
    calib = recipe.calibration
    n = nsamples if nsamples is not None else (calib.nsamples if calib else 0)
    seqlen = calib.seqlen if calib else 0
    steps = recipe.pipeline.steps
    if stream:  # the steps run one after another: the largest of their plans
        return max((plan.streamed_memory(config, _method(step) or "wanda",
                                         nsamples=n if step.needs_calibration else 0,
                                         seqlen=seqlen if step.needs_calibration else 0,
                                         dtype=dtype, input_dtype=input_dtype,
                                         inner=getattr(step, "method", None))
                    for step in steps), key=lambda p: p.host_bytes)
    methods = [m for m in (_method(s) for s in steps) if m] or [None]
    ev = recipe.eval
    teacher = recipe.recovery is not None and recipe.recovery.kind == "distill"
    plans = [plan.in_memory_prune(config, m, nsamples=n, seqlen=seqlen, dtype=dtype,
                                  input_dtype=input_dtype, eval_seqlen=ev.seqlen if ev else 0,
                                  eval_batch=ev.batch_size if ev else 1, teacher=teacher)
             for m in methods]
    return max(plans, key=lambda p: p.host_bytes)


def _streamable(recipe) -> bool:
    from nnxprune.errors import UserError
    from nnxprune.streamed import streamable_steps

    try:
        streamable_steps(recipe)
        return True
    except UserError:
        return False


def alternatives(recipe, config, *, stream: bool, dtype: str, input_dtype: str,
                 budget: int) -> list[tuple[str, plan.MemoryPlan]]:
    """Settings that would fit `budget` (command-line flags, and their plans), cheapest change
    first: bf16 weights, --stream (in fp32, then bf16), then fewer calibration samples."""
    options = []
    if dtype != "bfloat16":
        options.append(("--dtype bfloat16", dict(stream=stream, dtype="bfloat16")))
    if not stream and _streamable(recipe):
        options += [("--stream", dict(stream=True, dtype=dtype)),
                    ("--stream --dtype bfloat16", dict(stream=True, dtype="bfloat16"))]
    fits = []
    for flags, kw in options:
        p = run_plan(recipe, config, input_dtype=input_dtype, **kw)
        if p.host_bytes <= budget:
            fits.append((flags, p))
    calib = recipe.calibration
    if not fits and calib is not None and calib.nsamples > 1:
        best = dict(stream=stream or _streamable(recipe), dtype="bfloat16")
        n = calib.nsamples
        while n > 1:
            n //= 2
            p = run_plan(recipe, config, input_dtype=input_dtype, nsamples=n, **best)
            if p.host_bytes <= budget:
                flags = ("--stream " if best["stream"] and not stream else "") + "--dtype bfloat16"
                fits.append((f"{flags} --set calibration.nsamples={n}", p))
                break
    return fits


def _recovery_plan(recipe, predicted, echo) -> dict[str, Any] | None:
    """The [recovery] step's per-device bytes on the configured mesh (compiled abstractly)."""
    import math

    import jax

    from nnxprune.plan_distributed import plan_in_child

    cfg = recipe.recovery
    fixed = math.prod(v for v in dataclasses.asdict(cfg.mesh).values() if v != -1)
    sizes = cfg.mesh.resolve(max(jax.device_count(), fixed))
    spec = {"config": predicted.to_dict(), "mesh": sizes, "step": "train",
            "recovery": {**cfg.to_dict(), "mesh": sizes}, "masks": True,
            "layers": [1, 2] if predicted.is_uniform and predicted.num_layers > 2 else []}
    mesh = ", ".join(f"{k}={v}" for k, v in sizes.items())
    echo(f"training  compiling the {cfg.kind} step abstractly for mesh {mesh} (no weights; "
         f"NNXPRUNE_CHECK_NO_COMPILE=1 skips this)")
    got = plan_in_child(spec)
    b = got["bytes"]
    echo(f"training  {b['peak'] / plan.GB:.2f} GB per device ({cfg.kind}, mesh {mesh}; "
         f"arguments {b['argument'] / plan.GB:.2f}, temporaries {b['temp'] / plan.GB:.2f}; XLA "
         f"memory analysis, {got['method']})")
    return {"mesh": sizes, **got}


def check_memory(recipe, config, predicted=None, *, model: str, stream: bool = False,
                 dtype: str = "float32", budget_gb: float | None = None,
                 echo=print) -> dict[str, Any]:
    """Prints the run's predicted peak memory and whether it fits (module docstring); returns
    what it printed as a dict."""
    input_dtype = input_dtype_of(model)
    if stream and not _streamable(recipe):  # the streamed run refuses it, saying why
        echo("memory    --stream does not run this recipe: planning the in-memory run")
        stream = False
    p = run_plan(recipe, config, stream=stream, dtype=dtype, input_dtype=input_dtype)
    budget, source = plan.budget_bytes(budget_gb)
    echo(f"memory    {p.what}: predicted peak {p.describe()}; weights stored as {input_dtype}")
    if stream or plan.accelerator() is not None:
        echo(f"device    predicted peak {p.device_bytes / plan.GB:.2f} GB on an accelerator "
             f"(tallied, not yet measured on one)")
    out: dict[str, Any] = {"plan": plan.summary(p), "budget_source": source,
                           "budget_gb": budget / plan.GB if budget else None}
    if budget is not None:
        fits = p.host_bytes <= budget
        out["fits"] = fits
        if fits:
            echo(f"fits      {budget / plan.GB:.1f} GB ({source})")
        else:
            alt = alternatives(recipe, config, stream=stream, dtype=dtype,
                               input_dtype=input_dtype, budget=budget)
            out["alternatives"] = [{"flags": f, "host_gb": q.host_bytes / plan.GB} for f, q in alt]
            tips = "; ".join(f"{f} ({q.host_bytes / plan.GB:.1f} GB)" for f, q in alt) or \
                "none of --dtype bfloat16, --stream, fewer calibration samples would"
            echo(f"too big   {p.host_bytes / plan.GB:.1f} GB > {budget / plan.GB:.1f} GB "
                 f"({source}); settings that fit: {tips}")
    if recipe.recovery is not None and predicted is not None and \
            not os.environ.get("NNXPRUNE_CHECK_NO_COMPILE"):
        out["recovery"] = _recovery_plan(recipe, predicted, echo)
    return out
