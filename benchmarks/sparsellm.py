"""SparseGPT vs SparseLLM on SmolLM2-135M at 70/80/90% and 3:4, all layers and the first half.

One run, one machine: dense and every method x pattern x scope with the same calibration draw
(C4, 32 x 1024, seed 0) and the same protocol (WikiText-2, seqlen 1024, first 32 windows).
"half" prunes the first 50% of the decoder layers and leaves the rest dense (the setting of the
SparseLLM paper's tables): SparseLLM through `fraction = 0.5`, SparseGPT through a `targets` regex
over the same layers. For each row: perplexity, measured sparsity (over all layers), seconds,
peak memory while pruning, and for SparseLLM the MLP reconstruction error relative to the dense
MLP output on the calibration data, averaged over the pruned layers, after round 1 (which is
SparseGPT on the same inputs) and after the last round.

    python benchmarks/sparsellm.py                      # the whole table (hours on 2 CPU cores)
    python benchmarks/sparsellm.py --patterns 0.7 --scopes all --nsamples 8 --seqlen 512 \\
        --eval-windows 4 --out /tmp/sparsellm-quick.json                        # a quick look

Writes benchmarks/results/sparsellm.json and sparsellm.md (or next to --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def spec_for(method: str, pattern: str, scope: str, num_layers: int, args) -> dict:
    from nnxprune.transforms.sparsellm import first_layers

    spec = {"kind": method, "batch_size": args.batch_size,
            **({"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)})}
    if method == "sparsellm":
        spec["iterations"] = args.iterations
        if scope == "half":
            spec["fraction"] = 0.5
    elif scope == "half":
        spec["targets"] = r"^layers\.(?:" + "|".join(
            str(i) for i in range(first_layers(num_layers, 0.5))) + r")\."
    return spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="sparsegpt,sparsellm")
    p.add_argument("--patterns", default="0.7,0.8,0.9,3:4", help="unstructured sparsities and N:M patterns")
    p.add_argument("--scopes", default="all,half", help="all layers and/or the first half")
    p.add_argument("--iterations", type=int, default=8, help="SparseLLM rounds (reference: 8)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--out", default=str(RESULTS / "sparsellm.json"))
    args = p.parse_args(argv)

    from flax import nnx

    import nnxprune.transforms.sparsellm  # noqa: F401  (registers "sparsellm")
    from nnxprune.calibration import calibration_samples
    from nnxprune.evaluate import data as data_lib
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io import atomic
    from nnxprune.io.load import load_model
    from nnxprune.runner import PeakMemory, measured_sparsity
    from nnxprune.transforms import Context, from_dict

    loaded = load_model(args.model)
    num_layers = loaded.model.config.num_layers
    data_dir = data_lib.resolve_data_dir(None)
    protocol = protocol_for("wikitext2", seqlen=args.eval_seqlen, max_windows=args.eval_windows)
    windows = data_lib.windows(data_lib.token_stream(protocol, loaded.tokenizer, data_dir), protocol)
    t0 = time.perf_counter()
    calib = calibration_samples(loaded.tokenizer, dataset="c4", nsamples=args.nsamples,
                                seqlen=args.seqlen, seed=args.seed, data_dir=data_dir)
    draw_seconds = time.perf_counter() - t0

    rows = []
    dense = score_windows(loaded.model, windows, protocol, progress=False)
    rows.append({"method": "dense", "pattern": "-", "scope": "-", "ppl": dense.ppl,
                 "sparsity": measured_sparsity(loaded.model)["overall"]})
    print(f"dense ppl {dense.ppl:.3f}", flush=True)
    for scope in args.scopes.split(","):
        for pattern in args.patterns.split(","):
            for method in args.methods.split(","):
                spec = spec_for(method, pattern, scope, num_layers, args)
                transform = from_dict(spec)
                model = nnx.clone(loaded.model)
                transform.check(model.config)
                ctx = Context(tokens=calib.tokens, progress=False)
                t0 = time.perf_counter()
                with PeakMemory() as memory:
                    transform(model, ctx)
                seconds = time.perf_counter() - t0
                entry = ctx.report["transforms"][-1]
                result = score_windows(model, windows, protocol, progress=False)
                row = {"method": method, "scope": scope,
                       "pattern": pattern if ":" in pattern else f"{float(pattern):.0%}",
                       "ppl": result.ppl, "sparsity": measured_sparsity(model)["overall"],
                       "prune_seconds": seconds, "peak_memory_bytes": memory.peak,
                       "spec": spec, "timings": entry.get("timings", {})}
                if entry.get("damping_retries"):
                    row["damping_retries"] = entry["damping_retries"]
                if method == "sparsellm":
                    layers = entry["layers"]
                    row["mlp_relative_error_round1"] = float(np.mean(
                        [r["rounds"][0]["relative"] for r in layers.values()]))
                    row["mlp_relative_error_last"] = float(np.mean(
                        [r["rounds"][r["kept_round"]]["relative"] for r in layers.values()]))
                    row["layers"] = {str(k): v for k, v in layers.items()}
                rows.append(row)
                extra = (f"  MLP rel. error {row['mlp_relative_error_round1']:.4f} -> "
                         f"{row['mlp_relative_error_last']:.4f}" if method == "sparsellm" else "")
                print(f"{method:9s} {row['pattern']:>4s} {scope:4s}  ppl {row['ppl']:10.3f}  sparsity "
                      f"{row['sparsity']:.4f}  {seconds:7.1f} s  peak {memory.peak / 2**30:.2f} GiB"
                      f"{extra}", flush=True)
                del model

    report = {
        "benchmark": "sparsellm", "model": args.model, "source": loaded.source,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "threads": {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
        "calibration": {"dataset": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seed": args.seed, "source": str(calib.source), "draw_seconds": draw_seconds},
        "protocol": protocol.to_dict(), "protocol_text": protocol.describe(),
        "sparsellm_iterations": args.iterations, "rows": rows,
    }
    md = ["| method | pattern | layers | perplexity | sparsity (all layers) | prune s | peak memory | "
          "MLP rel. error round 1 -> kept |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            md.append(f"| dense | - | - | {r['ppl']:.2f} | {r['sparsity']:.2%} | | | |")
            continue
        err = (f"{r['mlp_relative_error_round1']:.4f} -> {r['mlp_relative_error_last']:.4f}"
               if "mlp_relative_error_last" in r else "")
        md.append(f"| {r['method']} | {r['pattern']} | {r['scope']} | {r['ppl']:.2f} | "
                  f"{r['sparsity']:.2%} | {r['prune_seconds']:.1f} | "
                  f"{r['peak_memory_bytes'] / 2**30:.2f} GiB | {err} |")
    md += ["", f"{args.model} ({loaded.source}); calibration c4 {args.nsamples} x {args.seqlen}, "
               f"seed {args.seed}; {protocol.describe()}. SparseLLM: alpha = beta = gamma = 5, "
               f"{args.iterations} rounds; 'half' = the first {nnxprune.transforms.sparsellm.first_layers(num_layers, 0.5)} "
               f"of {num_layers} layers, the rest dense."]
    text = "\n".join(md) + "\n"
    print(text)
    atomic.write_json(args.out, report)
    atomic.write_text(Path(args.out).with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
