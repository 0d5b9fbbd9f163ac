"""Post-training sparsity on SmolLM2-135M: nnxprune beside a torch baseline run in the same process.

One run, one machine: dense and every method/pattern (Magnitude, Wanda, SparseGPT, OWL over Wanda
or Magnitude; unstructured or N:M) with the same calibration draw (C4, 32 x 1024, seed 0) and the
same protocol (WikiText-2, seqlen 1024, first 32 windows). For Wanda and SparseGPT a second row
runs the same sequential algorithm in torch + transformers (`torch_reference.py`, the reference
algorithm of locuslab/wanda) right beside nnxprune's, at equal threads (`torch.set_num_threads` =
the cores XLA's CPU pool uses), who goes first alternating; its pruned weights are scored by the
same perplexity code. For each row: perplexity, measured sparsity, prune seconds (`prune_s`, end
to end of pruning), seconds of calibration forwards and of scoring/solving, peak memory while
pruning, the load average. The calibration floor is the FLOPs of the two forward passes per layer
over the calibration tokens divided by this machine's JAX matmul rate (measured here).

    python benchmarks/sparsity.py --rows wanda@0.5,sparsegpt@0.5,wanda@0.7,owl-wanda@0.7,\
        sparsegpt@0.7,owl-sparsegpt@0.7 --torch wanda@0.5,sparsegpt@0.5
    python benchmarks/sparsity.py                  # magnitude, wanda, sparsegpt x 50%, 2:4, 4:8
    python benchmarks/sparsity.py --rows wanda@2:4 --nsamples 2 --seqlen 128 --eval-windows 2 \
        --out /tmp/sparsity-smoke.json                                           # a quick look

Writes benchmarks/results/sparsity.json (`dense`, `rows`: implementation, method, pattern, ppl,
prune_s, ...; `comparisons`: torch / nnxprune time and perplexity, OWL / uniform) and sparsity.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_pruning_args, equal_threads, matmul_rate, prepare_pruning,  # noqa: E402
                    prune_and_score, pruning_report, write_results)


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


def _jobs(args) -> list[tuple[str, str]]:
    """(method, pattern) pairs: `--rows` as given, else every method x pattern."""
    if args.rows:
        return [tuple(item.split("@", 1)) for item in args.rows.split(",")]
    return [(m, p) for m in args.methods.split(",") for p in args.patterns.split(",")]


def _spec(method: str, pattern: str, batch_size: int) -> dict:
    base = {"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)}
    if method.startswith("owl-"):
        return {"kind": "owl", "method": method[4:], "batch_size": batch_size, **base}
    return {"kind": method, **base, **({} if method == "magnitude" else {"batch_size": batch_size})}


def nnxprune_row(setup, method: str, pattern: str, args) -> dict:
    row, entry = prune_and_score(setup, _spec(method, pattern, args.batch_size))
    forward = sum(v for k, v in entry.get("timings", {}).items() if k != "visit")
    row.update(implementation="nnxprune", method=method, prune_s=row["prune_seconds"],
               calibration_forward_seconds=forward, solve_seconds=row["prune_seconds"] - forward,
               timings=entry.get("timings", {}))
    if entry.get("layer_sparsity"):
        row["layer_sparsity"] = entry["layer_sparsity"]
    return row


def torch_row(setup, method: str, pattern: str) -> dict:
    """The torch + transformers baseline (torch_reference.py) on the same draw, scored by the
    same perplexity code."""
    import torch_reference as ref

    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.measure import PeakMemory, measured_sparsity

    n, m = map(int, pattern.split(":")) if ":" in pattern else (0, 0)
    model = ref.hf_model(setup.loaded.model)
    with PeakMemory() as memory:
        times = ref.prune(model, setup.calib.tokens, method,
                          sparsity=None if n else float(pattern), n=n, m=m)
    pruned = ref.to_nnx(model, setup.loaded.model.config)
    del model
    result = score_windows(pruned, setup.windows, setup.protocol, progress=False)
    return {"implementation": "torch", "method": method, "pattern": pattern if n else
            f"{float(pattern):.0%}", "ppl": result.ppl,
            "sparsity": measured_sparsity(pruned)["overall"], "prune_s": times["total"],
            "prune_seconds": times["total"], "calibration_forward_seconds": times["catch"] + times["forward"],
            "solve_seconds": times["solve"], "peak_memory_bytes": memory.peak,
            "memory_before_bytes": memory.start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt",
                   help="magnitude, wanda, sparsegpt, owl-wanda, owl-magnitude")
    p.add_argument("--patterns", default="0.5,2:4,4:8", help="unstructured sparsities and N:M patterns")
    p.add_argument("--rows", default="", help="method@pattern,... instead of methods x patterns")
    p.add_argument("--torch", default="wanda,sparsegpt",
                   help="methods (or method@pattern rows) that get a torch baseline row beside "
                        "nnxprune's ('' for none)")
    add_pruning_args(p, "sparsity.json")
    args = p.parse_args(argv)

    threads = equal_threads()
    setup = prepare_pruning(args)
    from nnxprune.transforms import from_dict
    for method, pattern in _jobs(args):  # every row's settings checked before any work
        from_dict(_spec(method, pattern, args.batch_size)).check(setup.loaded.model.config)
    rates = [matmul_rate()]  # measured again before every row; the median is the floor
    rows = []
    bound = working_set_bytes(setup.loaded.model.config, args.nsamples, args.seqlen, args.batch_size)
    baselines = set(filter(None, args.torch.split(",")))
    for k, (method, pattern) in enumerate(_jobs(args)):
        torch_too = method in baselines or f"{method}@{pattern}" in baselines
        order = ["nnxprune", "torch"] if torch_too else ["nnxprune"]
        for impl in (order[::-1] if k % 2 else order):  # alternate who goes first
            rates.append(matmul_rate())
            row = (torch_row(setup, method, pattern) if impl == "torch"
                   else nnxprune_row(setup, method, pattern, args))
            extra = row["peak_memory_bytes"] - row["memory_before_bytes"]
            row.update(floor_ratio=None, matmul_gflops_before=rates[-1], memory_added_bytes=extra,
                       memory_within_bound=bool(extra <= bound["total"]), loadavg=list(os.getloadavg()))
            rows.append(row)
            print(f"{impl:8s} {method:13s} {row['pattern']:>4s}  ppl {row['ppl']:10.3f}  sparsity "
                  f"{row['sparsity']:.4f}  {row['prune_s']:6.1f} s (forward "
                  f"{row['calibration_forward_seconds']:.1f}, solve {row['solve_seconds']:.1f})  peak "
                  f"{row['peak_memory_bytes'] / 2**30:.2f} GiB  load {row['loadavg'][0]:.2f}", flush=True)
            _write(args, setup, rows, rates, threads, quiet=True)  # a cut-off run keeps its rows
    _write(args, setup, rows, rates, threads)
    return 0


def _write(args, setup, rows, rates, threads, quiet=False) -> None:
    """The report so far: floors from the median matmul rate, comparisons, JSON and Markdown."""
    config = setup.loaded.model.config
    tokens = setup.calib.tokens.size
    flops = 2 * decoder_flops_per_token(config, args.seqlen) * tokens
    # per method: the two forward passes, plus what its statistics cost in matmuls (Wanda's and
    # Magnitude's none; SparseGPT's X^T X accumulation, part of its passes in the reference code)
    method_flops = {"sparsegpt": flops + hessian_flops_per_token(config) * tokens}
    rate = float(np.median(rates))
    floor = flops / (rate * 1e9)
    floors = {m: f / (rate * 1e9) for m, f in method_flops.items()}
    for row in rows:
        if row["method"] != "magnitude":
            row["calibration_floor_seconds"] = floors.get(row["method"], floor)
            row["floor_ratio"] = row["calibration_forward_seconds"] / row["calibration_floor_seconds"]
    weights = sum(int(np.prod(v.shape)) * v.dtype.itemsize
                  for v in jax.tree.leaves(nnx.state(setup.loaded.model, nnx.Param)))
    bound = working_set_bytes(config, args.nsamples, args.seqlen, args.batch_size)
    report = pruning_report("sparsity", args, setup, matmul_gflops=rate, matmul_gflops_runs=rates,
                            threads_equal=threads, calibration_floor_seconds=floor,
                            calibration_flops=flops, calibration_floor_seconds_by_method=floors,
                            calibration_flops_by_method=method_flops, weights_bytes=weights,
                            working_set_bound_bytes=bound, dense=setup.dense_row, rows=rows,
                            comparisons=comparisons(rows))
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    write_results(args.out, report, markdown(args, setup, report), quiet=quiet)


def comparisons(rows) -> list[dict]:
    """torch against nnxprune per method and pattern, and OWL against uniform at its sparsity."""
    by = {(r["implementation"], r["method"], r["pattern"]): r for r in rows}
    out = []
    for (impl, method, pattern), r in by.items():
        if impl == "torch" and ("nnxprune", method, pattern) in by:
            ours = by["nnxprune", method, pattern]
            out.append({"kind": "torch_vs_nnxprune", "method": method, "pattern": pattern,
                        "speedup": r["prune_s"] / ours["prune_s"],
                        "ppl_relative_difference": ours["ppl"] / r["ppl"] - 1})
        if impl == "nnxprune" and method.startswith("owl-") and ("nnxprune", method[4:], pattern) in by:
            uniform = by["nnxprune", method[4:], pattern]
            out.append({"kind": "owl_vs_uniform", "method": method, "pattern": pattern,
                        "ppl_owl": r["ppl"], "ppl_uniform": uniform["ppl"],
                        "ppl_relative_difference": r["ppl"] / uniform["ppl"] - 1,
                        "time_ratio": r["prune_s"] / uniform["prune_s"]})
    return out


def markdown(args, setup, report) -> str:
    rows, d, bound = report["rows"], report["dense"], report["working_set_bound_bytes"]
    rate, floor, floors = report["matmul_gflops"], report["calibration_floor_seconds"], \
        report["calibration_floor_seconds_by_method"]
    md = ["| implementation | method | pattern | perplexity | sparsity | prune s | calib. forward s | "
          "solve s | forward / floor | peak memory | added while pruning |",
          "|---|---|---|---|---|---|---|---|---|---|---|",
          f"| - | dense | - | {d['ppl']:.2f} | {d['sparsity']:.2%} | | | | | | |"]
    for r in rows:
        ratio = f"{r['floor_ratio']:.2f}x" if r["floor_ratio"] else "-"
        md.append(f"| {r['implementation']} | {r['method']} | {r['pattern']} | {r['ppl']:.2f} | "
                  f"{r['sparsity']:.2%} | {r['prune_s']:.1f} | {r['calibration_forward_seconds']:.1f} | "
                  f"{r['solve_seconds']:.1f} | {ratio} | {r['peak_memory_bytes'] / 2**30:.2f} GiB | "
                  f"{r['memory_added_bytes'] / 2**20:.0f} MiB |")
    md += ["", "| comparison | method | pattern | result |", "|---|---|---|---|"]
    for c in report["comparisons"]:
        if c["kind"] == "torch_vs_nnxprune":
            md.append(f"| torch / nnxprune prune time | {c['method']} | {c['pattern']} | "
                      f"{c['speedup']:.2f}x; perplexity {c['ppl_relative_difference']:+.2%} |")
        else:
            md.append(f"| OWL / uniform | {c['method']} | {c['pattern']} | perplexity "
                      f"{c['ppl_owl']:.2f} vs {c['ppl_uniform']:.2f} "
                      f"({c['ppl_relative_difference']:+.1%}); time {c['time_ratio']:.2f}x |")
    t = report["threads_equal"]
    md += ["", f"{args.model} ({setup.loaded.source}) on {report['machine']['cpu']}; calibration c4 "
               f"{args.nsamples} x {args.seqlen}, seed {args.seed}; {setup.protocol.describe()}. "
               f"One process, rows one after the other (the torch and nnxprune rows of a method "
               f"side by side, who goes first alternating), {t['jax_xla_cpu_threads']} XLA CPU threads "
               f"and torch.set_num_threads({t['torch_num_threads']}); the torch rows are "
               f"benchmarks/torch_reference.py (transformers' decoder layers, the sequential "
               f"algorithm of locuslab/wanda lib/prune.py) scored by the same perplexity code. "
               f"Matmul rate {rate:.0f} GFLOP/s (median of {len(report['matmul_gflops_runs'])}); "
               f"calibration floor {floor:.1f} s (two forward passes per layer; for SparseGPT "
               f"{floors['sparsegpt']:.1f} s with its X^T X). Peak memory is the process's resident "
               f"set while pruning; 'added' is that peak minus the resident set when pruning began "
               f"(bound {bound['total'] / 2**20:.0f} MiB, see working_set_bytes). Load average "
               f"per row in the JSON (highest {max(r['loadavg'][0] for r in rows):.2f}; the benchmark itself "
               f"keeps about 2 on 2 cores)."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
