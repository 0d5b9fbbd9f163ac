"""Sequential Wanda and SparseGPT in PyTorch + transformers: the baseline nnxprune is timed against.

An independent implementation of the reference algorithm of locuslab/wanda, `lib/prune.py`
(`prune_wanda`, `prune_sparsegpt`; statistics as `lib/layerwrapper.py` and `lib/sparsegpt.py`
gather them, the latter being IST-DASLab/sparsegpt's `SparseGPT.fasterprune`):

1. the first decoder layer's inputs and keyword arguments (position embeddings, mask) are caught
   by a wrapper that records them and stops the model's forward, one calibration sequence at a
   time;
2. per decoder layer (transformers' own `LlamaDecoderLayer`): forward hooks on every `nn.Linear`
   gather the statistics over one forward of the calibration sequences (one at a time, as the
   reference): Wanda the running mean of `||X_j||^2` per input `j`, SparseGPT the running mean of
   `2 X^T X`;
3. every projection of the layer is pruned: Wanda by `|W_ij| sqrt(||X_j||^2 / N)`, the smallest
   `int(in * sparsity)` of every output row (or N of every M inputs); SparseGPT by the blocked
   optimal-brain-surgeon update with the Cholesky factor of the damped inverse Hessian (as in
   the reference, an unstructured block prunes the scores `<=` its k-th smallest, k =
   `int(size * sparsity)`: one weight more than asked per block of 128 inputs, e.g. 50.04%
   instead of 50% on SmolLM2; nnxprune prunes exactly k);
4. a second forward of the pruned layer gives the next layer's inputs.

Papers: Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for Large Language
Models" (Wanda), arXiv 2306.11695; Frantar and Alistarh, "SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot", ICML 2023, arXiv 2301.00774. No code is copied.

The model is transformers' `LlamaForCausalLM` built from nnxprune's own weights (`hf_model`), so
both implementations start from the same numbers; `to_nnx` brings the pruned weights back so that
both are scored by the same perplexity code.

Example:
    >>> torch_model = hf_model(loaded.model)
    >>> info = prune(torch_model, calib.tokens, "wanda", sparsity=0.5)   # {"seconds": ...}
    >>> pruned = to_nnx(torch_model, loaded.model.config)
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

METHODS = ("wanda", "sparsegpt")


def hf_model(model):
    """transformers' `LlamaForCausalLM` (float32, eval mode) holding `model`'s weights."""
    import transformers

    from nnxprune.io.hf import to_hf_tensors
    from nnxprune.io.hf_config import config_to_hf

    hf = config_to_hf(model.config)
    hf.pop("architectures", None)
    config = transformers.LlamaConfig(**hf)
    config.use_cache = False
    out = transformers.LlamaForCausalLM(config).float().eval()
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in to_hf_tensors(model).items()}
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]:
        raise RuntimeError(f"weights do not fit transformers' Llama: missing {missing}, "
                           f"unexpected {unexpected}")
    if config.tie_word_embeddings:
        out.tie_weights()
    return out


def to_nnx(torch_model, config):
    """The torch model's weights as an nnxprune `Llama` of `config`."""
    from nnxprune.io.hf import model_from_tensors

    state = torch_model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return model_from_tensors(config, ((k, v.detach().float().numpy()) for k, v in state.items()),
                              source="torch baseline")


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records its input and keyword arguments, then stops."""

    def __init__(self, module, inputs: list, kwargs: dict):
        super().__init__()
        self.module, self.inputs, self.kwargs = module, inputs, kwargs

    def forward(self, hidden, *args, **kwargs):
        self.inputs.append(hidden)
        self.kwargs.update(kwargs)
        raise _Stop


def catch_inputs(model, tokens: np.ndarray):
    """Layer 0's inputs `[N, T, D]` over the calibration sequences (one forward each) and the
    keyword arguments the model passes its decoder layers."""
    layers = model.model.layers
    inputs, kwargs = [], {}
    layers[0] = _Catcher(layers[0], inputs, kwargs)
    try:
        for row in tokens:
            try:
                model(torch.from_numpy(np.asarray(row, np.int64))[None])
            except _Stop:
                pass
    finally:
        layers[0] = layers[0].module
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return torch.cat(inputs), kwargs


def linears(layer) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


class Stats:
    """The running statistic of one projection's input, updated by a forward hook as the
    reference does: Wanda `||X_j||^2 / N` per input, SparseGPT `2 / N X^T X` (N = sequences)."""

    def __init__(self, method: str, columns: int):
        self.method, self.n = method, 0
        self.value = (torch.zeros(columns) if method == "wanda" else torch.zeros(columns, columns))

    def __call__(self, module, inp, out):
        x = inp[0].detach()
        count = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.value *= self.n / (self.n + count)
        self.n += count
        if self.method == "wanda":
            self.value += (x * x).sum(dim=0) / self.n
        else:
            x = math.sqrt(2 / self.n) * x
            self.value += x.T @ x


def wanda_prune(W: torch.Tensor, scaler: torch.Tensor, sparsity: float, n: int = 0, m: int = 0):
    """Zeroes, in place, Wanda's smallest `|W| sqrt(scaler)` per output row (or N of every M)."""
    metric = W.abs() * torch.sqrt(scaler.reshape(1, -1))
    mask = torch.zeros_like(W, dtype=torch.bool)
    if n:
        for j in range(0, W.shape[1], m):
            block = metric[:, j:j + m]
            mask.scatter_(1, j + torch.topk(block, n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, :int(W.shape[1] * sparsity)], True)
    W[mask] = 0


def _inverse_upper(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of `(H + damp I)^-1`, damp relative to the mean diagonal.

    The factorizations run on one thread, as nnxprune's LAPACK calls do under the project's
    `OPENBLAS_NUM_THREADS=1`: on this 2-core machine, shared, MKL's two-thread Cholesky and
    inverse of a 1536 x 1536 Hessian took 12.7 s against 1.2 s on one thread (one run, 3 each)."""
    H = H.clone()
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    finally:
        torch.set_num_threads(threads)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, n: int = 0, m: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT on `W [out, in]` with Hessian `H [in, in]`: masks chosen per block of
    `blocksize` inputs (or per N:M group) by `w^2 / [H^-1]_jj^2`, the error of every pruned
    input spread over the inputs after it. Returns the pruned float32 `W`."""
    W, H = W.clone().float(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U = _inverse_upper(H, percdamp)
    cols = W.shape[1]
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(U1)
        if n:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = W1 ** 2 / d.reshape(1, -1) ** 2
            mask1 = score <= torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
        for i in range(b1 - b0):
            if n and i % m == 0:
                score = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, n, dim=1, largest=False)[1], True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]
    return W


def _layer_forward(layer, inps, outs, kwargs) -> None:
    for j in range(inps.shape[0]):
        out = layer(inps[j:j + 1], **kwargs)
        outs[j] = (out[0] if isinstance(out, tuple) else out)[0]


@torch.no_grad()
def prune(model, tokens: np.ndarray, method: str, *, sparsity: float | None = None, n: int = 0,
          m: int = 0, blocksize: int = 128, percdamp: float = 0.01) -> dict:
    """Prunes every projection of every decoder layer of `model` in place, sequentially (module
    docstring). Returns seconds: `total`, `catch` (layer 0's inputs), `forward` (both forwards
    of every layer, hooks included), `solve` (scoring and pruning)."""
    if method not in METHODS:
        raise ValueError(f"torch baseline: method must be one of {METHODS}, got {method!r}")
    if (sparsity is None) == (not n):
        raise ValueError("torch baseline: give a sparsity or n and m")
    t_start = time.perf_counter()
    inps, kwargs = catch_inputs(model, tokens)
    outs = torch.zeros_like(inps)
    times = {"catch": time.perf_counter() - t_start, "forward": 0.0, "solve": 0.0}
    for layer in model.model.layers:
        subset = linears(layer)
        stats = {name: Stats(method, lin.in_features) for name, lin in subset.items()}
        handles = [subset[name].register_forward_hook(stats[name]) for name in subset]
        t0 = time.perf_counter()
        try:
            _layer_forward(layer, inps, outs, kwargs)
        finally:
            for h in handles:
                h.remove()
        t1 = time.perf_counter()
        for name, lin in subset.items():
            if method == "wanda":
                wanda_prune(lin.weight.data, stats[name].value, sparsity, n, m)
            else:
                lin.weight.data = sparsegpt_prune(lin.weight.data, stats[name].value, sparsity, n,
                                                  m, blocksize, percdamp).to(lin.weight.dtype)
            stats[name] = None
        t2 = time.perf_counter()
        _layer_forward(layer, inps, outs, kwargs)
        times["forward"] += (t1 - t0) + (time.perf_counter() - t2)
        times["solve"] += t2 - t1
        inps, outs = outs, inps
    times["total"] = time.perf_counter() - t_start
    return times


def sparsity_of(model) -> float:
    """Exact zeros over every decoder-layer projection."""
    zeros = total = 0
    for layer in model.model.layers:
        for lin in linears(layer).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return zeros / total
