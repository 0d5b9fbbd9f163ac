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
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_pruning_args, matmul_rate, prepare_pruning, prune_and_score,  # noqa: E402
                    pruning_report, write_results)


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


def hessian_flops_per_token(config) -> float:
    """Matmul FLOPs of one token's SparseGPT statistics: `H += X^T X` (a full `[in, in]` product,
    2 * in^2 per token, as the reference's forward hooks compute it) for every distinct projection
    input of every layer: the q/k/v input, the o input, the gate/up input and the down input
    (projections that read the same input share one Hessian)."""
    total = 0.0
    for s in config.layers:
        d, q, f = config.hidden_size, s.num_heads * config.head_dim, s.intermediate_size
        total += 2 * (d * d + q * q + d * d + f * f)
    return total


def working_set_bytes(config, nsamples: int, seqlen: int, batch_size: int) -> dict:
    """What pruning may hold beside the model (already resident before pruning starts): one
    layer (float32 kernels and their boolean masks, once more for the pruned copy), the
    calibration activations (the layer's inputs and outputs, `[N, T, D]` float32 each), the
    statistics of every projection input (X^T X, `[in, in]` float32 each), one batch's forward
    temporaries (about `[b, T, 3F + 6D]` float32) and SparseGPT's per-matrix arrays (kernel, mask,
    factor and its inverse Hessian, `[in, out]` and `[in, in]` float32). The memory bound of the
    issue is the model weights plus this."""
    widest = max(config.layers, key=lambda s: s.intermediate_size)
    d, f = config.hidden_size, widest.intermediate_size
    q, kv = widest.num_heads * config.head_dim, widest.num_kv_heads * config.head_dim
    params = d * q + 2 * d * kv + q * d + 3 * d * f
    inputs = {"q": d, "k": d, "v": d, "o": q, "gate": d, "up": d, "down": f}
    parts = {"layer": params * (4 + 1) * 2,
             "activations": 2 * nsamples * seqlen * d * 4,
             "statistics": sum(i * i * 4 for i in inputs.values()),
             "batch_forward": batch_size * seqlen * (3 * f + 6 * d) * 4,
             "sparsegpt_matrix": max(i * i for i in inputs.values()) * 4 * 3 + d * f * 4 * 3}
    return {**parts, "total": sum(parts.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--patterns", default="0.5,2:4,4:8", help="unstructured sparsities and N:M patterns")
    add_pruning_args(p, "sparsity.json")
    args = p.parse_args(argv)

    setup = prepare_pruning(args)
    rates = [matmul_rate()]  # measured again before every method; the median is the floor
    tokens = setup.calib.tokens.size
    flops = 2 * decoder_flops_per_token(setup.loaded.model.config, args.seqlen) * tokens
    # per method: the two forward passes, plus what its statistics cost in matmuls (Wanda's and
    # Magnitude's none; SparseGPT's X^T X accumulation, part of its passes in the reference code)
    method_flops = {"sparsegpt": flops + hessian_flops_per_token(setup.loaded.model.config) * tokens}
    rows = [setup.dense_row]
    bound = working_set_bytes(setup.loaded.model.config, args.nsamples, args.seqlen, args.batch_size)
    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            spec = {"kind": method, **({"pattern": pattern} if ":" in pattern
                                       else {"sparsity": float(pattern)})}
            if method != "magnitude":
                spec["batch_size"] = args.batch_size
            rates.append(matmul_rate())
            row, entry = prune_and_score(setup, spec)
            forward = sum(v for k, v in entry.get("timings", {}).items() if k != "visit")
            extra = row["peak_memory_bytes"] - row["memory_before_bytes"]
            row.update(calibration_forward_seconds=forward,
                       solve_seconds=row["prune_seconds"] - forward, floor_ratio=None,
                       matmul_gflops_before=rates[-1], memory_added_bytes=extra,
                       memory_within_bound=bool(extra <= bound["total"]))
            rows.append(row)
            print(f"{method:9s} {row['pattern']:>4s}  ppl {row['ppl']:10.3f}  sparsity "
                  f"{row['sparsity']:.4f}  {row['prune_seconds']:6.1f} s (forward {forward:.1f}, "
                  f"solve {row['solve_seconds']:.1f})  peak {row['peak_memory_bytes'] / 2**30:.2f} GiB",
                  flush=True)

    rate = float(np.median(rates))
    floor = flops / (rate * 1e9)
    floors = {m: f / (rate * 1e9) for m, f in method_flops.items()}
    for row in rows:
        if row.get("calibration_forward_seconds"):
            row["calibration_floor_seconds"] = floors.get(row["method"], floor)
            row["floor_ratio"] = row["calibration_forward_seconds"] / row["calibration_floor_seconds"]
    print(f"matmul {rate:.0f} GFLOP/s (median of {len(rates)}); calibration floor {floor:.1f} s "
          f"({flops / 1e12:.2f} TFLOP: two passes over {tokens:,} tokens); SparseGPT "
          f"{floors['sparsegpt']:.1f} s (with its X^T X, {method_flops['sparsegpt'] / 1e12:.2f} TFLOP)",
          flush=True)
    weights = sum(int(np.prod(v.shape)) * v.dtype.itemsize
                  for v in jax.tree.leaves(nnx.state(setup.loaded.model, nnx.Param)))
    report = pruning_report("sparsity", args, setup, matmul_gflops=rate, matmul_gflops_runs=rates,
                            calibration_floor_seconds=floor, calibration_flops=flops,
                            calibration_floor_seconds_by_method=floors,
                            calibration_flops_by_method=method_flops,
                            weights_bytes=weights, working_set_bound_bytes=bound, rows=rows)
    md = ["| method | pattern | perplexity | sparsity | prune s | calib. forward s | solve s | "
          "forward / floor | peak memory | added while pruning |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            md.append(f"| dense | - | {r['ppl']:.2f} | {r['sparsity']:.2%} | | | | | | |")
            continue
        ratio = f"{r['floor_ratio']:.2f}x" if r["floor_ratio"] else "-"
        md.append(f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['sparsity']:.2%} | "
                  f"{r['prune_seconds']:.1f} | {r['calibration_forward_seconds']:.1f} | "
                  f"{r['solve_seconds']:.1f} | {ratio} | {r['peak_memory_bytes'] / 2**30:.2f} GiB | "
                  f"{r['memory_added_bytes'] / 2**20:.0f} MiB |")
    md += ["", f"{args.model} ({setup.loaded.source}); calibration c4 {args.nsamples} x {args.seqlen}, "
               f"seed {args.seed}; {setup.protocol.describe()}. Matmul rate {rate:.0f} GFLOP/s (median "
               f"of {len(rates)}); calibration floor {floor:.1f} s (two forward passes per layer; for "
               f"SparseGPT {floors['sparsegpt']:.1f} s, the passes plus its X^T X accumulation, "
               f"{method_flops['sparsegpt'] / 1e12:.1f} TFLOP). "
               f"Peak memory is the process's resident set while pruning (the dense model, its copy "
               f"being pruned, the evaluation windows and the runtime included); 'added' is that peak "
               f"minus the resident set when pruning began, against a bound of "
               f"{bound['total'] / 2**20:.0f} MiB for one layer, the calibration activations, the "
               f"statistics, one batch's forward and one SparseGPT matrix (model weights: "
               f"{weights / 2**20:.0f} MiB, resident before). Within the bound: "
               f"{sum(r.get('memory_within_bound', False) for r in rows)} of {len(rows) - 1} rows."]
    write_results(args.out, report, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
