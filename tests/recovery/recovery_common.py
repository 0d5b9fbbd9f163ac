"""Shared pieces of the recovery tests: a tiny GQA Llama, learnable synthetic token windows, and
the one training run both the 1-device test and the 8-device subprocess make."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.recovery import RecoveryConfig
from nnxprune.data import TokenWindows

VOCAB, SEQLEN = 128, 32
CFG = LlamaConfig.uniform(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, intermediate_size=128, head_dim=16)


def tiny_model(seed: int = 0, masked: bool = True) -> Llama:
    """The tiny model; with `masked`, 2:4-style masks on every MLP kernel and on one q_proj."""
    model = Llama(CFG, rngs=nnx.Rngs(seed))
    if masked:
        key = jax.random.key(seed + 100)
        for i, layer in enumerate(model.layers):
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                key, sub = jax.random.split(key)
                lin.set_mask(jax.random.bernoulli(sub, 0.5, lin.kernel.shape))
        layer0 = model.layers[0].self_attn.q_proj
        rows = jnp.arange(layer0.kernel.shape[0])[:, None] % 4 < 2  # 2 of every 4 inputs kept
        layer0.set_mask(jnp.broadcast_to(rows, layer0.kernel.shape))
    return model


def windows(n_train: int = 64, n_heldout: int = 8, seed: int = 0) -> TokenWindows:
    """Windows cut from a fixed random cycle of 48 tokens: a pattern a tiny model can learn."""
    rng = np.random.default_rng(seed)
    cycle = rng.integers(0, VOCAB, size=48)
    stream = np.tile(cycle, (n_train + n_heldout) * SEQLEN // 48 + 2)

    def cut(n, offset):
        starts = rng.integers(0, 48, size=n) + offset
        return np.stack([stream[s:s + SEQLEN] for s in starts]).astype(np.int32)

    return TokenWindows(train=cut(n_train, 0), heldout=cut(n_heldout, 48), source="synthetic")


def domain_windows() -> dict[str, TokenWindows]:
    """Two domains for dynamic batch loading: "easy", the learnable cycle above, and "hard",
    uniform random tokens, whose loss cannot fall below log(VOCAB)."""
    rng = np.random.default_rng(1)
    noise = TokenWindows(train=rng.integers(0, VOCAB, (64, SEQLEN)).astype(np.int32),
                         heldout=rng.integers(0, VOCAB, (8, SEQLEN)).astype(np.int32),
                         source="noise")
    return {"easy": windows(), "hard": noise}


DOMAINS = {"easy": {"source": "c4", "weight": 1.0}, "hard": {"source": "c4", "weight": 1.0}}
DOMAIN_MESH_RUN = {"steps": 4, "batch_size": 8, "grad_accum": 2, "eval_every": 2,
                   "eval_batches": 1, "domains": DOMAINS, "reference": "initial-loss"}


def config(**overrides) -> RecoveryConfig:
    base = {"kind": "pretrain", "steps": 20, "batch_size": 8, "grad_accum": 1, "seqlen": SEQLEN,
            "lr": 3e-3, "warmup_steps": 2, "eval_every": 0, "eval_batches": 0}
    base.update(overrides)
    return RecoveryConfig.from_dict(base)


MESH_RUN = {"steps": 4, "batch_size": 8, "grad_accum": 2}
