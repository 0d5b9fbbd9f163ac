"""Shared pieces of the inspect tests: tiny (and heterogeneous) Llama configs, a randomly drawn
model, and an N:M mask that keeps the largest weights."""

import numpy as np
from conftest import randomize_params
from flax import nnx

from nnxprune.models.llama import LayerShape, Llama, LlamaConfig

HETERO_LAYERS = (LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=128),
                 LayerShape(num_heads=2, num_kv_heads=1, intermediate_size=96),
                 LayerShape(num_heads=4, num_kv_heads=1, intermediate_size=64))


def tiny(**kwargs) -> LlamaConfig:
    kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=128, head_dim=16)
    kw.update(kwargs)
    return LlamaConfig.uniform(**kw)


def build(cfg: LlamaConfig, seed: int = 0) -> Llama:
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed)


def n_of_m_mask(kernel, n: int, m: int) -> np.ndarray:
    """Keeps the n largest |w| of every m consecutive inputs (axis 0) of each output column."""
    k = np.abs(np.asarray(kernel))
    rows, cols = k.shape
    rank = np.argsort(np.argsort(k.reshape(rows // m, m, cols), axis=1), axis=1)
    return (rank >= m - n).reshape(rows, cols)
