"""Post-training sparsity on SmolLM2-135M: Magnitude, Wanda, SparseGPT x {50%, 2:4, 4:8}.

One run, one machine: dense and every method/pattern with the same calibration draw (C4, 32 x
1024, seed 0) and the same protocol (WikiText-2, seqlen 1024, first 32 windows). For each row:
perplexity, measured sparsity, seconds of calibration forwards and of scoring/solving, peak
memory while pruning. The calibration floor is the FLOPs of the driver's two forward passes per
layer over the calibration tokens divided by this machine's JAX matmul rate (measured here).

    python benchmarks/sparsity.py                          # the whole table (~30-40 min on 2 cores)
    python benchmarks/sparsity.py --methods wanda --patterns 2:4 --eval-windows 4   # a quick look

Writes benchmarks/results/sparsity.json and sparsity.md.
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
from common import machine_info, matmul_rate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def decoder_flops_per_token(config, seqlen: int) -> float:
    """Matmul FLOPs of one token through every decoder layer (projections + causal attention)."""
    total = 0.0
    for s in config.layers:
        q, kv = s.num_heads * config.head_dim, s.num_kv_heads * config.head_dim
        d, f = config.hidden_size, s.intermediate_size
        params = d * q + 2 * d * kv + q * d + 3 * d * f
        attention = 2 * 2 * (seqlen / 2) * q  # scores and values over half the window on average
        total += 2 * params + attention
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--patterns", default="0.5,2:4,4:8", help="unstructured sparsities and N:M patterns")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--out", default=str(RESULTS / "sparsity.json"))
    args = p.parse_args(argv)

    from flax import nnx

    from nnxprune.calibration import calibration_samples
    from nnxprune.evaluate import data as data_lib
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io import atomic
    from nnxprune.io.load import load_model
    from nnxprune.runner import PeakMemory, measured_sparsity
    from nnxprune.transforms import Context, from_dict

    loaded = load_model(args.model)
    data_dir = data_lib.resolve_data_dir(None)
    protocol = protocol_for("wikitext2", seqlen=1024, max_windows=args.eval_windows)
    windows = data_lib.windows(data_lib.token_stream(protocol, loaded.tokenizer, data_dir), protocol)
    t0 = time.perf_counter()
    calib = calibration_samples(loaded.tokenizer, dataset="c4", nsamples=args.nsamples,
                                seqlen=args.seqlen, seed=args.seed, data_dir=data_dir)
    draw_seconds = time.perf_counter() - t0
    rates = [matmul_rate()]  # measured again before every method; the median is the floor
    flops = 2 * decoder_flops_per_token(loaded.model.config, args.seqlen) * calib.tokens.size

    rows = []
    dense = score_windows(loaded.model, windows, protocol, progress=False)
    rows.append({"method": "dense", "pattern": "-", "ppl": dense.ppl,
                 "sparsity": measured_sparsity(loaded.model)["overall"]})
    print(f"dense ppl {dense.ppl:.3f}", flush=True)
    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            spec = {"kind": method, **({"pattern": pattern} if ":" in pattern
                                       else {"sparsity": float(pattern)})}
            if method != "magnitude":
                spec["batch_size"] = args.batch_size
            transform = from_dict(spec)
            rates.append(matmul_rate())
            model = nnx.clone(loaded.model)
            transform.check(model.config)
            ctx = Context(tokens=calib.tokens, progress=False)
            t0 = time.perf_counter()
            with PeakMemory() as memory:
                transform(model, ctx)
            seconds = time.perf_counter() - t0
            timings = ctx.report["transforms"][-1].get("timings", {})
            forward = sum(v for k, v in timings.items() if k != "visit")
            result = score_windows(model, windows, protocol, progress=False)
            row = {"method": method, "pattern": pattern if ":" in pattern else f"{float(pattern):.0%}",
                   "ppl": result.ppl, "sparsity": measured_sparsity(model)["overall"],
                   "prune_seconds": seconds, "calibration_forward_seconds": forward,
                   "solve_seconds": seconds - forward, "peak_memory_bytes": memory.peak,
                   "floor_ratio": None}
            retries = ctx.report["transforms"][-1].get("damping_retries")
            if retries:
                row["damping_retries"] = retries
            row["matmul_gflops_before"] = rates[-1]
            rows.append(row)
            print(f"{method:9s} {row['pattern']:>4s}  ppl {row['ppl']:10.3f}  sparsity "
                  f"{row['sparsity']:.4f}  {seconds:6.1f} s (forward {forward:.1f}, solve "
                  f"{seconds - forward:.1f})  peak {memory.peak / 2**30:.2f} GiB", flush=True)
            del model

    rate = float(np.median(rates))
    floor = flops / (rate * 1e9)
    for row in rows:
        if row.get("calibration_forward_seconds"):
            row["floor_ratio"] = row["calibration_forward_seconds"] / floor
    print(f"matmul {rate:.0f} GFLOP/s (median of {len(rates)}); calibration floor {floor:.1f} s "
          f"({flops / 1e12:.2f} TFLOP: two passes over {calib.tokens.size:,} tokens)", flush=True)
    report = {
        "benchmark": "sparsity", "model": args.model, "source": loaded.source,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "threads": {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
        "calibration": {"dataset": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seed": args.seed, "source": str(calib.source), "draw_seconds": draw_seconds},
        "protocol": protocol.to_dict(), "protocol_text": protocol.describe(),
        "matmul_gflops": rate, "matmul_gflops_runs": rates, "calibration_floor_seconds": floor, "calibration_flops": flops,
        "rows": rows,
    }
    md = ["| method | pattern | perplexity | sparsity | prune s | calib. forward s | solve s | "
          "forward / floor | peak memory |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            md.append(f"| dense | - | {r['ppl']:.2f} | {r['sparsity']:.2%} | | | | | |")
            continue
        ratio = f"{r['floor_ratio']:.2f}x" if r["floor_ratio"] else "-"
        md.append(f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['sparsity']:.2%} | "
                  f"{r['prune_seconds']:.1f} | {r['calibration_forward_seconds']:.1f} | "
                  f"{r['solve_seconds']:.1f} | {ratio} | {r['peak_memory_bytes'] / 2**30:.2f} GiB |")
    md += ["", f"SmolLM2-135M ({loaded.source}); calibration c4 {args.nsamples} x {args.seqlen}, "
               f"seed {args.seed}; {protocol.describe()}. Matmul rate {rate:.0f} GFLOP/s; "
               f"calibration floor {floor:.1f} s (two forward passes per layer)."]
    text = "\n".join(md) + "\n"
    print(text)
    atomic.write_json(args.out, report)
    atomic.write_text(Path(args.out).with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
