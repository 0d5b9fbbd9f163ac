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
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_pruning_args, prepare_pruning, prune_and_score,  # noqa: E402
                    pruning_report, write_results)


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


def _resumed_rows(args, setup) -> dict:
    """Rows of an earlier run at `args.out` with the same model, draw, protocol and rounds, by
    (method, pattern, scope); an earlier run of other settings is an error, not a silent mix."""
    import json

    path = Path(args.out)
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    same = (old.get("model") == args.model and old.get("sparsellm_iterations") == args.iterations
            and old.get("protocol") == setup.protocol.to_dict()
            and all(old["calibration"].get(k) == getattr(args, k) for k in ("nsamples", "seqlen", "seed")))
    if not same:
        raise SystemExit(f"--resume: {path} was written with other settings; use another --out")
    return {tuple(r["key"]): r for r in old["rows"] if "key" in r}


def _write(args, setup, num_layers, rows, quiet=False) -> None:
    from nnxprune.transforms.sparsellm import first_layers

    report = pruning_report("sparsellm", args, setup, sparsellm_iterations=args.iterations, rows=rows)
    md = ["| method | pattern | layers | perplexity | sparsity (all layers) | prune s | peak memory | "
          "MLP rel. error round 1 -> kept | layers worse than round 1 | objective last / first |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            md.append(f"| dense | - | - | {r['ppl']:.2f} | {r['sparsity']:.2%} | | | | | |")
            continue
        err = worse = ratio = ""
        if "mlp_relative_error_last" in r:
            err = f"{r['mlp_relative_error_round1']:.4f} -> {r['mlp_relative_error_last']:.4f}"
            layers = r["layers"].values()
            worse = (f"{sum(v['rounds'][v['kept_round']]['relative'] > v['rounds'][0]['relative'] for v in layers)}"
                     f" of {len(layers)}")
            ratio = f"{np.mean([v['rounds'][-1]['after'] / v['rounds'][0]['before'] for v in layers]):.3f}"
        md.append(f"| {r['method']} | {r['pattern']} | {r['scope']} | {r['ppl']:.2f} | "
                  f"{r['sparsity']:.2%} | {r['prune_seconds']:.1f} | "
                  f"{r['peak_memory_bytes'] / 2**30:.2f} GiB | {err} | {worse} | {ratio} |")
    md += ["", f"{args.model} ({setup.loaded.source}); calibration c4 {args.nsamples} x {args.seqlen}, "
               f"seed {args.seed}; {setup.protocol.describe()}. SparseLLM: alpha = beta = gamma = 5, "
               f"{args.iterations} rounds; 'half' = the first {first_layers(num_layers, 0.5)} "
               f"of {num_layers} layers, the rest dense. 'Objective' is the relaxed SparseLLM objective "
               f"(all four terms) after the last round over before the first, averaged over the "
               f"pruned layers; the MLP error is the true one, ||Y - MLP_pruned(X)||^2 / ||Y||^2."]
    write_results(args.out, report, "\n".join(md) + "\n", quiet=quiet)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="sparsegpt,sparsellm")
    p.add_argument("--patterns", default="0.7,0.8,0.9,3:4", help="unstructured sparsities and N:M patterns")
    p.add_argument("--scopes", default="all,half", help="all layers and/or the first half")
    p.add_argument("--iterations", type=int, default=8, help="SparseLLM rounds (reference: 8)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows an earlier run of the same settings wrote to --out")
    add_pruning_args(p, "sparsellm.json")
    args = p.parse_args(argv)

    setup = prepare_pruning(args)
    num_layers = setup.loaded.model.config.num_layers
    rows = [{**setup.dense_row, "scope": "-"}]
    done = _resumed_rows(args, setup) if args.resume else {}
    for scope in args.scopes.split(","):
        for pattern in args.patterns.split(","):
            for method in args.methods.split(","):
                spec = spec_for(method, pattern, scope, num_layers, args)
                if (method, pattern, scope) in done:
                    rows.append(done[method, pattern, scope])
                    print(f"{method:9s} {pattern:>4s} {scope:4s}  (from {args.out})", flush=True)
                    continue
                row, entry = prune_and_score(setup, spec)
                row.update(scope=scope, spec=spec, key=[method, pattern, scope],
                           timings=entry.get("timings", {}))
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
                      f"{row['sparsity']:.4f}  {row['prune_seconds']:7.1f} s  peak "
                      f"{row['peak_memory_bytes'] / 2**30:.2f} GiB{extra}", flush=True)
                _write(args, setup, num_layers, rows, quiet=True)  # a cut-off run keeps its rows
    _write(args, setup, num_layers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
