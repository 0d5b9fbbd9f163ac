"""What the data-parallel calibration tests compare (test_data_parallel.py on 8 forced CPU
devices, test_multiprocess_calibration.py on 2 processes): on a tiny random GQA Llama, every
collector's statistics and the masks and kernels every post-training method leaves, as flat
`{key: array}` dicts (saved as .npz by the subprocesses, compared bit for bit with this process's
1-device run).

Cases: the sequences split evenly (one batch per device on 8 devices), in whole batches that do
not fill the devices (padding batches, left out of every sum), and two batches per device (the
ordered sum runs across a device's own batches and then across devices)."""

from __future__ import annotations

import os
import sys

import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from conftest import randomize_params  # noqa: E402

from nnxprune.calibration.collectors import (Activations, BlockInfluence,  # noqa: E402
                                             ChannelMeanAbs, InputSumSq, InputXtX)
from nnxprune.calibration.sequential import collect_statistics  # noqa: E402
from nnxprune.models.llama import Llama, LlamaConfig  # noqa: E402
from nnxprune.transforms import Context  # noqa: E402
from nnxprune.transforms.depth import Depth  # noqa: E402
from nnxprune.transforms.owl import OWL  # noqa: E402
from nnxprune.transforms.sparsegpt import SparseGPT  # noqa: E402
from nnxprune.transforms.sparsellm import SparseLLM  # noqa: E402
from nnxprune.transforms.wanda import Wanda  # noqa: E402
from nnxprune.transforms.width import Width  # noqa: E402

CFG = LlamaConfig.uniform(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                          intermediate_size=64, head_dim=8, max_position_embeddings=64)
SEQLEN = 24
# name -> (sequences, batch_size): on 8 devices 8 batches of 2 (one each), 3 batches of 4 (five
# devices hold only padding) and 16 batches of 2 (two each); on 2 x 2 devices 2, 1 and 4 each
CASES = {"even": (16, 2), "padded": (12, 4), "two_per_device": (32, 2)}
PROJECTIONS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def tokens_for(case: str) -> np.ndarray:
    n, _ = CASES[case]
    return np.random.default_rng(7).integers(0, CFG.vocab_size, (n, SEQLEN)).astype(np.int32)


def build() -> Llama:
    return randomize_params(Llama(CFG, rngs=nnx.Rngs(0)), seed=0, scale=0.3)


def statistics(case: str) -> dict[str, np.ndarray]:
    """Every collector of the driver over every layer of the dense model."""
    collectors = [InputSumSq(names=PROJECTIONS), InputXtX(names=PROJECTIONS),
                  ChannelMeanAbs(names=PROJECTIONS + NORMS), BlockInfluence(),
                  Activations(names=("mlp.gate_proj",))]
    stats = collect_statistics(build(), tokens_for(case), collectors,
                               batch_size=CASES[case][1], progress=False)
    out = {}
    for i, by_name in stats.items():
        for collector, value in by_name.items():
            for name, array in (value.items() if isinstance(value, dict) else [("", value)]):
                out[f"stats/{case}/{i}/{collector}/{name}"] = np.asarray(array)
    return out


def methods(batch_size: int) -> dict:
    return {"wanda": Wanda(sparsity=0.5, batch_size=batch_size),
            "wanda_2of4": Wanda(pattern="2:4", batch_size=batch_size),
            "sparsegpt": SparseGPT(sparsity=0.5, blocksize=16, batch_size=batch_size),
            "owl": OWL(sparsity=0.5, outlier_m=2.0, lam=0.08, batch_size=batch_size),
            "sparsellm": SparseLLM(sparsity=0.5, iterations=2, blocksize=16,
                                   batch_size=batch_size),
            "shortgpt": Depth(count=1, batch_size=batch_size),
            "minitron": Width(intermediate=40, heads=2, hidden=24, batch_size=batch_size)}


METHODS = tuple(methods(1))


def pruned(case: str, names, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array (masks, kernels) of the model each method in `names` leaves."""
    out = {}
    tokens = tokens_for(case)
    for name in names:
        model = methods(CASES[case][1])[name](build(), Context(tokens=tokens, progress=False))
        for path, value in nnx.to_flat_state(nnx.state(model)):
            out[f"{prefix}{name}/{case}/" + ".".join(map(str, path))] = np.asarray(value.get_value())
    return out


def compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> list[str]:
    """The keys whose arrays differ in any bit (or are missing on one side)."""
    differ = sorted(set(got) ^ set(want))
    for key in sorted(set(got) & set(want)):
        a, b = got[key], want[key]
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
            differ.append(key)
    return differ
