"""SparseLLM on the first layers of SmolLM2-135M, for before/after comparisons of the core.

SparseLLM at 70% on the first 3 layers (`fraction = 0.1`), 3 rounds, 16 x 512 C4 tokens (the
reference draw, seed 0): prints and writes the per-round MLP reconstruction errors of every
pruned layer and SparseGPT's error of every attention projection (JSON), and the masks and
kernels of every pruned projection (`.npz`), so two checkouts can be compared entry by entry:

    PYTHONPATH=OLD_CHECKOUT python benchmarks/sparsellm_ab.py --tokens t.npy --out /tmp/old
    PYTHONPATH=. python benchmarks/sparsellm_ab.py --tokens t.npy --out /tmp/new

`--tokens` reads the calibration tokens from a `.npy` file (so both sides read the same draw
whatever their data code); without it they are drawn here and saved beside `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from nnxprune.io.load import load_model
from nnxprune.transforms import Context, SparseLLM

NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", help="calibration tokens [16, 512] as .npy (default: draw them)")
    ap.add_argument("--out", required=True, help="path prefix of the .json and .npz outputs")
    args = ap.parse_args()
    taken = [f for f in (args.out + ".json", args.out + ".npz", args.out + ".tokens.npy")
             if os.path.exists(f)]
    if taken:
        ap.error(f"{', '.join(taken)} already exist; choose another --out (nothing is overwritten)")
    loaded = load_model("smollm2-135m")
    if args.tokens:
        tokens = np.load(args.tokens)
    else:
        from nnxprune.data import calibration_samples

        tokens = calibration_samples(loaded.tokenizer, dataset="c4", nsamples=16, seqlen=512,
                                     seed=0).tokens
        np.save(args.out + ".tokens.npy", tokens)
    model, ctx = loaded.model, Context(tokens=tokens, progress=False)
    t0 = time.perf_counter()
    SparseLLM(sparsity=0.7, fraction=0.1, iterations=3)(model, ctx)
    seconds = time.perf_counter() - t0
    entry = ctx.report["transforms"][-1]
    arrays = {}
    for i in range(3):
        for name in NAMES:
            node = model.layers[i]
            for part in name.split("."):
                node = getattr(node, part)
            arrays[f"{i}.{name}.mask"] = np.asarray(node.mask[...])
            arrays[f"{i}.{name}.kernel"] = np.asarray(node.kernel[...])
    summary = {"seconds": seconds, "errors": entry["reconstruction_error"],
               "layers": {str(k): [r["reconstruction"] for r in v["rounds"]]
                          for k, v in entry["layers"].items()}}
    np.savez(args.out + ".npz", **arrays)
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
