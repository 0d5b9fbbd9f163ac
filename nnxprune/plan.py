"""Peak memory predicted from a model's config alone, before any weight is loaded (DESIGN.md, 12).

`nnxprune prune --check` prints these numbers, and says when a run would not fit the machine
(issue 28, item 6). Each plan is a sum of named terms in bytes, tallied from what the code holds
(`nnxprune.streamed`, `nnxprune.calibration.streamed`, `nnxprune.io.layers`), with its two
constants measured (`benchmarks/plan_memory.py`, `benchmarks/results/plan_memory.json`):

Streamed (`prune --stream`): peak RSS = overhead + max(embedding phase, layer phase), where

- overhead: Python, JAX, the tokenizer and the calibration text (`OVERHEAD`, measured on a
  4-layer hidden-256 model, where nothing else is large);
- embedding phase: the embedding (and an untied head with it) read in the input dtype for the
  output's last shard, then the embedding read again for the first activations;
- layer phase: one decoder layer at `layer_bytes_per_weight` bytes per weight (read in the input
  dtype, onloaded in the run dtype, its bool masks, a matrix's fp32 score and keep mask, the copy
  written in the output dtype: 14 for bf16 weights run in fp32), SparseGPT's Hessians and their
  factors (fp32, per projection input), SparseLLM's `tokens x mlp` auxiliaries, the host
  activations of every calibration sample (inputs, the pieces of the outputs and their
  concatenation: `3 N T D` fp32) and the working set of one sequence's forward (MLP
  intermediates and the top attention tile). The file pages mapped while a layer is read, and
  the masked kernels of the pruned forward, did not show in the measurements (the 3-layer
  hidden-2048 model peaked at 1.66 GB, 14 bytes per layer weight above the overhead and the
  activations), so they are not counted.

In memory (`prune`, `eval`): the whole model in the run dtype, masks (one byte per pruned weight),
the largest shard mapped while loading, a distillation teacher's copy, the calibration activations
on the device, logits of an evaluation batch, and Orbax's save, measured as `SAVE_COPY` times the
model's bytes.

The device peak (an accelerator run) is the layer phase without its host-only terms (the read and
written copies, the host activations) plus one batch of activations; on CPU it is the host's.

Example:
    >>> p = streamed_memory(config, "wanda", nsamples=128, seqlen=2048, input_dtype="bfloat16")
    >>> p.host_bytes / 1e9, p.parts_gb()
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

GB = 1e9
# measured on this machine's stack (benchmarks/results/plan_memory.json): the peak RSS of a
# streamed Wanda run on a 4-layer hidden-256 model (Python, JAX, tokenizer, C4 calibration text),
# 0.780 GB, started from a shell (a fork, so `ru_maxrss` is the run's own)
OVERHEAD = 0.78e9
# Orbax's save (`io.checkpoint.save_checkpoint`): resident memory above the loaded model while it
# writes, in model bytes; measured on the 3-layer hidden-2048 model in float32 (+2.03 GB on 1.78)
SAVE_COPY = 1.14
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
MASKING = ("magnitude", "wanda", "sparsegpt", "owl", "sparsellm")  # soft edits: bool masks
STREAMED = ("magnitude", "wanda", "sparsegpt", "owl", "sparsellm", "depth", "width")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """A predicted peak: `host_bytes` (RSS), `device_bytes` (an accelerator's, None on CPU-only
    plans), `parts` (the terms of the phase that peaks, bytes), `what` (the run described)."""

    what: str
    host_bytes: int
    device_bytes: int
    parts: dict[str, int]

    def parts_gb(self) -> dict[str, float]:
        return {k: round(v / GB, 3) for k, v in self.parts.items()}

    def describe(self) -> str:
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:4]
        return (f"{self.host_bytes / GB:.2f} GB host peak ("
                + ", ".join(f"{k} {v / GB:.2f}" for k, v in top) + ")")


def nbytes(dtype: str) -> int:
    return DTYPE_BYTES[str(dtype)]


# -- shapes ----------------------------------------------------------------------------------------
def projections(config, i: int) -> dict[str, tuple[int, int]]:
    """`{name: (in, out)}` of decoder layer `i`'s seven projections."""
    s, d, dh = config.layers[i], config.hidden_size, config.head_dim
    q, kv, f = s.num_heads * dh, s.num_kv_heads * dh, s.intermediate_size
    return {"self_attn.q_proj": (d, q), "self_attn.k_proj": (d, kv), "self_attn.v_proj": (d, kv),
            "self_attn.o_proj": (q, d), "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f),
            "mlp.down_proj": (f, d)}


def layer_weights(config, i: int) -> int:
    """Parameters of decoder layer `i` (projections and its two norms)."""
    return sum(a * b for a, b in projections(config, i).values()) + 2 * config.hidden_size


def model_weights(config) -> int:
    """Parameters of the whole model (the embedding once more when the head is untied)."""
    embed = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embed
    return (sum(layer_weights(config, i) for i in range(config.num_layers)) + embed + head
            + config.hidden_size)


def _widest(config) -> int:
    """The decoder layer with the most weights (the one that sets the layer phase)."""
    return max(range(config.num_layers), key=lambda i: layer_weights(config, i))


def _hessian_bytes(config, i: int) -> int:
    """SparseGPT's fp32 statistics of layer `i` at their peak, while the widest input's Hessian is
    factored: one `X^T X` per projection (the collector's), the factors of the other distinct
    inputs (q/k/v share one, gate/up one), and the Hessian being factored with the host
    factorization's four temporaries of its size (the identity, the damped sum, the Cholesky
    factor and its inverse; `algorithms.sparsegpt._host_factor_with_retries`)."""
    ins = [a for a, _ in projections(config, i).values()]
    distinct = [ins[0], ins[3], ins[4], ins[6]]
    return 4 * (sum(a * a for a in ins) + sum(a * a for a in distinct) + 4 * max(ins) ** 2)


def _forward_bytes(config, i: int, seqlen: int) -> int:
    """Working set of one sequence through layer `i` (the drivers map over sequences): the MLP's
    gate, up and product, q/k/v/attention output, the residual stream pieces and the top tile of
    the blocked causal attention (`T/2 x T/2` scores per query head, fp32, with its exponent)."""
    s, d, dh = config.layers[i], config.hidden_size, config.head_dim
    if not seqlen:
        return 0
    width = 3 * s.intermediate_size + 2 * (s.num_heads + 2 * s.num_kv_heads) * dh + 4 * d
    return 4 * seqlen * width + 2 * 4 * s.num_heads * (seqlen // 2) ** 2


def layer_bytes_per_weight(method: str, input_dtype: str, dtype: str) -> float:
    """Host bytes per weight of the layer being pruned (module docstring)."""
    read, run, out = nbytes(input_dtype), nbytes(dtype), nbytes(input_dtype)
    if method in ("depth",):  # read, onloaded, written: no masks, no scores
        return read + run + out
    if method == "width":  # the sliced copy besides
        return read + 2 * run + out
    return read + run + 1 + 4 + 1 + out


# -- the plans -------------------------------------------------------------------------------------
def streamed_memory(config, method: str, *, nsamples: int, seqlen: int, dtype: str = "float32",
                    input_dtype: str = "bfloat16", batch_size: int = 8,
                    inner: str | None = None) -> MemoryPlan:
    """`prune --stream` with `method` (`STREAMED`; OWL prunes with `inner`) on `nsamples` x
    `seqlen` calibration tokens (0 without calibration), weights read in `input_dtype` and onloaded
    in `dtype` (module docstring)."""
    if method not in STREAMED:
        raise ValueError(f"no streamed plan for {method!r}; known: {', '.join(STREAMED)}")
    base = inner if method == "owl" and inner else method
    i, d = _widest(config), config.hidden_size
    tokens = nsamples * seqlen
    embed = config.vocab_size * d * nbytes(input_dtype) * (1 if config.tie_word_embeddings else 2)
    layer = int(layer_weights(config, i) * layer_bytes_per_weight(base, input_dtype, dtype))
    terms = {"layer": layer,
             "activations": 3 * tokens * d * 4,
             "forward": _forward_bytes(config, i, seqlen) if tokens else 0}
    if base in ("sparsegpt", "sparsellm"):
        terms["hessians"] = _hessian_bytes(config, i)
    if base == "sparsellm":  # z, s, p and their updates (~7 tokens x mlp), X and Y (tokens x D)
        terms["sparsellm"] = 4 * tokens * (7 * config.layers[i].intermediate_size + 2 * d)
    phase = sum(terms.values())
    parts = {"overhead": int(OVERHEAD), **(terms if phase >= embed else {"embedding": embed})}
    on_device = (int(layer_weights(config, i) * (nbytes(dtype) + 6)) + terms.get("hessians", 0)
                 + terms["forward"] + 2 * min(batch_size, max(nsamples, 1)) * seqlen * d * 4)
    return MemoryPlan(f"prune --stream ({method}, {dtype})", int(OVERHEAD + max(phase, embed)),
                      on_device, parts)


def _load_bytes(config, dtype: str, input_dtype: str) -> dict[str, int]:
    """The whole model in the run dtype, and the largest file mapped while it is read."""
    shard = max([layer_weights(config, i) for i in range(config.num_layers)]
                + [config.vocab_size * config.hidden_size])
    return {"weights": model_weights(config) * nbytes(dtype),
            "loading": 2 * shard * nbytes(input_dtype)}


def in_memory_prune(config, method: str | None, *, nsamples: int, seqlen: int,
                    dtype: str = "float32", input_dtype: str = "bfloat16", eval_seqlen: int = 0,
                    eval_batch: int = 1, teacher: bool = False, save: bool = True) -> MemoryPlan:
    """The in-memory `prune` (load, prune with `method`, evaluate windows of `eval_seqlen`,
    save): the model, its masks, and the largest of the steps' working sets."""
    base = _load_bytes(config, dtype, input_dtype)
    i, d = _widest(config), config.hidden_size
    weights = base["weights"]
    parts = {"weights": weights}
    if method in MASKING:
        parts["masks"] = sum(layer_weights(config, j) for j in range(config.num_layers))
    if teacher:
        parts["teacher"] = weights
    tokens = nsamples * seqlen
    prune = 0
    if method is not None:
        per = layer_bytes_per_weight(method, dtype, dtype) - 2 * nbytes(dtype)
        prune = int(layer_weights(config, i) * max(per, 0)) + 3 * tokens * d * 4
        prune += _forward_bytes(config, i, seqlen) if tokens else 0
        if method in ("sparsegpt", "sparsellm"):
            prune += _hessian_bytes(config, i)
    steps = {"loading": base["loading"], "pruning": prune,
             "evaluation": (_eval_bytes(config, eval_seqlen, eval_batch)  # + masked kernels
                            + (parts.get("masks", 0) * nbytes(dtype))) if eval_seqlen else 0,
             "saving": int(SAVE_COPY * weights) if save else 0}
    worst = max(steps, key=steps.get)
    parts[worst] = steps[worst]
    host = int(OVERHEAD + sum(parts.values()))
    return MemoryPlan(f"prune ({method}, {dtype}, in memory)", host,
                      host - int(OVERHEAD) - (parts.get("loading", 0) + parts.get("saving", 0)),
                      {"overhead": int(OVERHEAD), **parts})


def _eval_bytes(config, seqlen: int, batch: int) -> int:
    """An evaluation batch's logits (fp32, with the log-softmax's copies) and forward."""
    i = _widest(config)
    return batch * (3 * seqlen * config.vocab_size * 4 + _forward_bytes(config, i, seqlen))


def eval_memory(config, *, dtype: str = "float32", seqlen: int = 1024, batch_size: int = 1,
                input_dtype: str = "bfloat16") -> MemoryPlan:
    """`nnxprune eval`: the model in the run dtype and one batch's logits and forward."""
    base = _load_bytes(config, dtype, input_dtype)
    steps = {"loading": base["loading"], "evaluation": _eval_bytes(config, seqlen, batch_size)}
    worst = max(steps, key=steps.get)
    parts = {"overhead": int(OVERHEAD), "weights": base["weights"], worst: steps[worst]}
    return MemoryPlan(f"eval ({dtype})", int(sum(parts.values())),
                      base["weights"] + steps["evaluation"], parts)


# -- the machine -----------------------------------------------------------------------------------
def available_bytes() -> int | None:
    """Memory available to a new process: psutil's `available`, else /proc/meminfo's
    MemAvailable; None when neither can be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def budget_bytes(budget_gb: float | None = None) -> tuple[int | None, str]:
    """The memory a run may use and where that number comes from."""
    if budget_gb is not None:
        return int(budget_gb * GB), "--memory-budget"
    env = os.environ.get("NNXPRUNE_MEMORY_BUDGET_GB")
    if env:
        return int(float(env) * GB), "NNXPRUNE_MEMORY_BUDGET_GB"
    return available_bytes(), "available on this machine"


def summary(plan: MemoryPlan) -> dict[str, Any]:
    return {"what": plan.what, "host_gb": plan.host_bytes / GB,
            "device_gb": plan.device_bytes / GB, "parts_gb": plan.parts_gb()}


def accelerator() -> str | None:
    """The kind of the first JAX device when it is not the CPU (its memory is the device peak's
    budget), else None."""
    import jax

    device = jax.devices()[0]
    return None if device.platform == "cpu" else str(device.device_kind)
