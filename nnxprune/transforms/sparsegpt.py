"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", arXiv 2301.00774; code IST-DASLab/sparsegpt): OBS pruning with weight updates from
`H = 2/n X^T X` (`nnxprune.algorithms.sparsegpt`), on the sequential driver: X^T X of every
targeted projection's input from one forward of the unpruned layer (the `InputXtX` collector),
the pruned layer's outputs feeding the next layer.

Example:
    >>> SparseGPT(pattern="2:4")(model, Context(tokens=calibration_tokens))
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from nnxprune.algorithms.sparsegpt import hessian, hessian_factor, sparsegpt_prune
from nnxprune.calibration.collectors import InputXtX
from nnxprune.calibration.sequential import run_sequential
from nnxprune.errors import UserError
from nnxprune.graph import mask_weights
from nnxprune.models.llama import LlamaConfig
from nnxprune.transforms.base import Context, register
from nnxprune.transforms.sparsify import (Sparsify, by_layer, calibration_tokens, measured, node,
                                          record)

# Projections that read the same tensor (so the same Hessian): SparseGPT factors it once.
SHARED_INPUT = {"self_attn.q_proj": "self_attn.input", "self_attn.k_proj": "self_attn.input",
                "self_attn.v_proj": "self_attn.input", "mlp.gate_proj": "mlp.input",
                "mlp.up_proj": "mlp.input"}


def shared_factor(cache: dict, name: str, H, percdamp: float):
    """SparseGPT's Hessian factor for projection `name` of one layer (its Hessian `H`), computed
    once per input tensor: `cache` maps each input (`SHARED_INPUT`) to its factor."""
    key = SHARED_INPUT.get(name, name)
    if key not in cache:
        cache[key] = hessian_factor(H, percdamp=percdamp)
    return cache[key]


def check_solver(blocksize: int, percdamp: float, nm) -> None:
    """The SparseGPT solver settings every SparseGPT-based transform shares."""
    if blocksize < 1:
        raise UserError(f"blocksize must be >= 1, got {blocksize}")
    if not 0 < percdamp < 1:
        raise UserError(f"percdamp must be in (0, 1), got {percdamp}")
    if nm is not None and blocksize % nm[1]:
        raise UserError(f"blocksize {blocksize} must be a multiple of M={nm[1]}")


@register("sparsegpt")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPT(Sparsify):
    """OBS pruning with weight updates (blocked, lazy batch updates), sequential calibration."""

    needs_calibration: ClassVar[bool] = True

    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8
    kind: ClassVar[str]

    def check(self, config: LlamaConfig) -> LlamaConfig:
        check_solver(self.blocksize, self.percdamp, self.nm())
        return super().check(config)

    streamable: ClassVar[bool] = True

    def layer_collectors(self, names):
        return [InputXtX.for_layers(names)]

    def prune_layer(self, i, layer, calib, names, log):
        nm = self.nm()
        factors = {}
        for name in names:
            lin = node(layer, name)
            H = hessian(calib.stats[InputXtX.name][name], calib.sequences)
            try:
                kernel, keep, info = sparsegpt_prune(
                    lin.effective_kernel(), H, factor=shared_factor(factors, name, H, self.percdamp),
                    sparsity=None if nm else self.sparsity_of(i), n=nm[0] if nm else 0,
                    m=nm[1] if nm else 0, blocksize=self.blocksize)
            except ValueError as e:
                raise UserError(f"SparseGPT: layers.{i}.{name}: {e}") from None
            full = f"layers.{i}.{name}"
            if not np.isfinite(np.asarray(kernel)).all():
                raise FloatingPointError(f"SparseGPT produced non-finite weights in {full}")
            lin.kernel.set_value(kernel.astype(lin.kernel.dtype))
            mask_weights(lin, keep)
            log.setdefault("per_matrix", {})[full] = measured(lin)
            log.setdefault("reconstruction_error", {})[full] = float(info.get("error", float("nan")))
            if info.get("retries"):
                log.setdefault("damping_retries", {})[full] = {
                    "retries": int(info["retries"]), "damping": float(info["damping"])}

    def __call__(self, model, ctx: Context):
        tokens = calibration_tokens(ctx)
        log = {"per_matrix": {}, "damping_retries": {}, "reconstruction_error": {}}
        names = by_layer(self.selected(model.config))

        def visit(i, layer, calib):
            self.prune_layer(i, layer, calib, names[i], log)

        timings = run_sequential(model, tokens, visit, self.layer_collectors(names),
                                 batch_size=self.batch_size, progress=ctx.progress, desc="sparsegpt")
        record(ctx, self.kind, log["per_matrix"], pattern=self.pattern or "unstructured",
               timings=timings, calibration_tokens=int(tokens.size),
               damping_retries=log["damping_retries"],
               reconstruction_error=log["reconstruction_error"])
        return model
