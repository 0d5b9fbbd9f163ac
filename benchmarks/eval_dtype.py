"""Perplexity evaluation in float32 and in bfloat16 weights, side by side: speed and memory.

Each run is a child process of its own (so its peak RSS, `ru_maxrss`, is that run's alone: load,
compile and scoring), started in turn for each setting and repeat (float32, bfloat16, float32,
...), so that load from other processes on a shared machine falls on all alike. Every child loads
SmolLM2-135M with `--dtype`'s weights (`load_model(param_dtype=...)`), scores one window untimed
(warm-up), then scores the same `--windows` WikiText-2 windows with `score_windows` (the
in-memory evaluator) or `evaluate_streamed` (layer by layer from the lazy layer source, `--stream`
rows). Reported per setting: tokens/s (median over `--repeats`), peak RSS (median), the bytes of
the loaded weights, the perplexity; and the ratios bf16 / fp32 of the in-memory rows.

A `masked` row scores the float32 model with Magnitude 50% masks on every projection, as a pruned
model is evaluated in memory (`evaluate.layerwise` folds one layer's masks at a time, so the
masked kernels are never all alive at once).

    python benchmarks/eval_dtype.py                        # 5 settings x 3 repeats, one child each
    python benchmarks/eval_dtype.py --windows 2 --settings float32 bfloat16    # fp32 vs bf16 only

Writes benchmarks/results/eval_dtype.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, median  # noqa: E402

SETTINGS = {  # name -> (dtype, mode)
    "float32": ("float32", "memory"),
    "bfloat16": ("bfloat16", "memory"),
    "float32 masked": ("float32", "masked"),
    "float32 streamed": ("float32", "stream"),
    "bfloat16 streamed": ("bfloat16", "stream"),
}


def child(args) -> dict:
    """One run (module docstring): load, warm up, score; the measurements as a dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nnxprune import data as data_lib
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io.load import load_model

    dtype, mode = SETTINGS[args.child]
    loaded = load_model(args.model, param_dtype=jnp.dtype(dtype))
    weight_bytes = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)))
    protocol = protocol_for("wikitext2", seqlen=args.seqlen, max_windows=args.windows,
                            batch_size=args.batch_size)
    data_dir = data_lib.resolve_data_dir(None)
    windows = data_lib.windows(data_lib.token_stream(protocol, loaded.tokenizer, data_dir), protocol)
    if mode == "masked":
        from nnxprune.transforms import Context
        from nnxprune.transforms.magnitude import Magnitude

        Magnitude(sparsity=0.5)(loaded.model, Context(progress=False))
    if mode == "stream":
        from nnxprune.evaluate.streamed import evaluate_streamed_windows
        from nnxprune.io.layers import open_layers

        del loaded  # the streamed evaluation reads the weights layer by layer from their file
        source = open_layers(args.model)
        evaluate_streamed_windows(source, windows[:args.batch_size], protocol, progress=False,
                                  param_dtype=jnp.dtype(dtype))  # warm-up (and compilation)
        result = evaluate_streamed_windows(source, windows, protocol, progress=False,
                                           param_dtype=jnp.dtype(dtype))
    else:
        score_windows(loaded.model, windows[:args.batch_size], protocol, progress=False)  # warm-up
        result = score_windows(loaded.model, windows, protocol, progress=False)
    jax.block_until_ready(jnp.zeros(()))
    return {"setting": args.child, "dtype": dtype, "mode": mode, "ppl": result.ppl,
            "tokens": result.tokens, "seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second, "weight_bytes": weight_bytes,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def run_child(setting: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", setting, "--model", args.model,
           "--windows", str(args.windows), "--seqlen", str(args.seqlen),
           "--batch-size", str(args.batch_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"{setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], settings: list[str]) -> dict:
    rows = {}
    for name in settings:
        mine = [r for r in runs if r["setting"] == name]
        rows[name] = {"dtype": mine[0]["dtype"], "mode": mine[0]["mode"], "ppl": mine[0]["ppl"],
                      "weight_bytes": mine[0]["weight_bytes"],
                      "tokens_per_second": median([r["tokens_per_second"] for r in mine]),
                      "tokens_per_second_runs": [r["tokens_per_second"] for r in mine],
                      "peak_rss_gb": median([r["peak_rss_gb"] for r in mine]),
                      "peak_rss_gb_runs": [r["peak_rss_gb"] for r in mine]}
    ratios = {}
    if {"float32", "bfloat16"} <= set(rows):
        f, b = rows["float32"], rows["bfloat16"]
        ratios = {"bf16_over_fp32_tokens_per_second": b["tokens_per_second"] / f["tokens_per_second"],
                  "bf16_over_fp32_peak_rss": b["peak_rss_gb"] / f["peak_rss_gb"],
                  "bf16_over_fp32_weight_bytes": b["weight_bytes"] / f["weight_bytes"]}
    return {"rows": rows, "ratios": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default=str(RESULTS / "eval_dtype.json"))
    p.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    from nnxprune.io import atomic

    info = machine_info()
    runs = []
    t0 = time.perf_counter()
    for r in range(args.repeats):
        for name in args.settings:
            runs.append(run_child(name, args))
            print(f"repeat {r + 1}/{args.repeats} {name:18s} {runs[-1]['tokens_per_second']:8.1f} "
                  f"tokens/s, peak RSS {runs[-1]['peak_rss_gb']:.2f} GB, ppl {runs[-1]['ppl']:.4f}",
                  flush=True)
    report = {"benchmark": "eval_dtype", "model": args.model, "windows": args.windows,
              "seqlen": args.seqlen, "batch_size": args.batch_size, "repeats": args.repeats,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {**info, "loadavg_end": list(os.getloadavg())},
              "wall_seconds": time.perf_counter() - t0, **summarize(runs, args.settings),
              "runs": runs}
    for name, row in report["rows"].items():
        print(f"{name:18s} {row['tokens_per_second']:8.1f} tokens/s  peak RSS "
              f"{row['peak_rss_gb']:.2f} GB  weights {row['weight_bytes'] / 1e6:.0f} MB  "
              f"ppl {row['ppl']:.4f}")
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.3f}")
    atomic.write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
