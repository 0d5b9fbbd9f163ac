"""SparseGPT vs SparseLLM on SmolLM2-135M: 4 rounds (the reference's schedule), 8, and keep-best.

One run, one machine: dense and every method x variant x pattern x scope with the same
calibration draw (C4, 32 x 1024, seed 0) and the same protocol (WikiText-2, seqlen 1024, first 32
windows). SparseLLM variants (`--variants`):
- `4`: the reference `llama_sparsellm`'s schedule as the recipes run it: 4 rounds, 1 round in the
  second and the last two layers (`layer_iterations = [[1, 1], [-2, 1], [-1, 1]]`);
- `8`: 8 rounds in every layer (the reference's earlier setting);
- `best`: the `4` schedule with `keep_best` (our departure: per layer, the round with the lowest
  true MLP error on the calibration batch; round 1 is SparseGPT).
"half" prunes the first 50% of the decoder layers and leaves the rest dense (the setting of the
SparseLLM paper's tables). For each row: perplexity, measured sparsity (over all layers), prune
seconds, peak memory, and for SparseLLM the MLP reconstruction error relative to the dense MLP
output on the calibration data, averaged over the pruned layers, after round 1 (SparseGPT on the
same inputs) and for the kept round, and the mean seconds per round. The SparseLLM variants of a
sparsity run right after its SparseGPT row; the `8` rows come last (the longest).

    python benchmarks/sparsellm.py                      # 70/80/90%, all layers (hours on 2 cores)
    python benchmarks/sparsellm.py --patterns 0.7 --variants 4 --nsamples 8 --seqlen 512 \
        --eval-windows 4 --out /tmp/sparsellm-quick.json                        # a quick look

Writes benchmarks/results/sparsellm.json (`rows`: method, rounds (4, 8 or "best"; absent for
SparseGPT), sparsity, scope, ppl, prune_s, ...) and sparsellm.md (or next to --out).

`--paper-protocol` runs the SparseLLM paper's setting instead (Bai et al., 2024, Sec. 5: the first
half of the decoder layers, 32 calibration samples of 2048 tokens, alpha and beta chosen from a
grid): the 4-round schedule over `--alphas` x `--betas` (default {0.1, 1, 10}^2) at 80%, the pair
with the lowest perplexity at 70% and 90%, and SparseGPT on the same layers at each sparsity. Its
rows (`scope: "first_half"`) go under the key `paper_protocol` of --out, the file's other keys
kept, its table into sparsellm_paper_protocol.md; `--resume` keeps the rows already there.

    python benchmarks/sparsellm.py --paper-protocol --resume      # ~3 h on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_pruning_args, prepare_pruning, prune_and_score,  # noqa: E402
                    pruning_report, write_results)


REFERENCE_SCHEDULE = [[1, 1], [-2, 1], [-1, 1]]  # llama_sparsellm: 1 round in layers 1, 30, 31 of 32
VARIANTS = {"4": {"iterations": 4, "layer_iterations": REFERENCE_SCHEDULE},
            "8": {"iterations": 8},
            "best": {"iterations": 4, "layer_iterations": REFERENCE_SCHEDULE, "keep_best": True}}


def spec_for(method: str, variant: str | None, pattern: str, scope: str, num_layers: int, args,
             ab: tuple[float, float] | None = None) -> dict:
    from nnxprune.transforms.sparsellm import first_layers

    spec = {"kind": method, "batch_size": args.batch_size,
            **({"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)})}
    if method == "sparsellm":
        spec.update(VARIANTS[variant])
        if ab is not None:
            spec.update(alpha=ab[0], beta=ab[1])
        if scope == "half":
            spec["fraction"] = 0.5
    elif scope == "half":
        spec["targets"] = r"^layers\.(?:" + "|".join(
            str(i) for i in range(first_layers(num_layers, 0.5))) + r")\."
    return spec


def _grid(args) -> list[tuple[float, float] | None]:
    """The (alpha, beta) pairs of --alphas x --betas; [None] (the recipe's 5, 5) when not given."""
    if not args.alphas and not args.betas:
        return [None]
    try:
        alphas = [float(a) for a in (args.alphas or "5").split(",")]
        betas = [float(b) for b in (args.betas or "5").split(",")]
    except ValueError as e:
        raise SystemExit(f"--alphas/--betas: {e}") from None
    if min(alphas + betas) <= 0:
        raise SystemExit("--alphas/--betas: every value must be > 0")
    return [(a, b) for a in alphas for b in betas]


def _jobs(args) -> list[tuple]:
    """(method, variant, pattern, scope, (alpha, beta) or None): per scope and pattern SparseGPT
    then the SparseLLM variants (each over the alpha x beta grid), except `8`, whose rows come
    after all others."""
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r} (known: {', '.join(VARIANTS)})")
    grid = _grid(args)
    first, last = [], []
    for scope in args.scopes.split(","):
        for pattern in args.patterns.split(","):
            if not args.no_sparsegpt:
                first.append(("sparsegpt", None, pattern, scope, None))
            for v in variants:
                (last if v == "8" else first).extend(
                    ("sparsellm", v, pattern, scope, ab) for ab in grid)
    return first + last


def _resumed_rows(args, setup) -> dict:
    """Rows of an earlier run at `args.out` with the same model, draw, protocol and variants, by
    (method, variant, pattern, scope); an earlier run of other settings is an error, not a silent mix."""
    import json

    path = Path(args.out)
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if not _same_settings(old, args, setup):
        raise SystemExit(f"--resume: {path} was written with other settings; use another --out")
    return {_key(*r["key"]): r for r in old["rows"] if "key" in r}


def _same_settings(old: dict, args, setup) -> bool:
    """Whether an earlier report was written with this run's model, variants, protocol and draw."""
    return (old.get("model") == args.model and old.get("variants") == VARIANTS
            and old.get("protocol") == setup.protocol.to_dict()
            and all(old["calibration"].get(k) == getattr(args, k) for k in ("nsamples", "seqlen", "seed")))


def _key(method, variant, pattern, scope, ab=None) -> tuple:
    return (method, variant, pattern, scope, None if ab is None else tuple(ab))


def _label(r) -> str:
    if r["method"] == "sparsegpt":
        return "sparsegpt"
    ab = r["spec"].get("alpha", 5.0), r["spec"].get("beta", 5.0)
    return f"sparsellm, {r['rounds']}" + (
        " rounds" if r["rounds"] != "best" else " (keep-best, 4-round schedule)") + (
        f", alpha {ab[0]:g} beta {ab[1]:g}" if ab != (5.0, 5.0) else "")


def _write(args, setup, num_layers, rows, quiet=False) -> None:
    from nnxprune.transforms.sparsellm import first_layers

    report = pruning_report("sparsellm", args, setup, variants=VARIANTS, dense=setup.dense_row,
                            rows=rows)
    d = setup.dense_row
    md = ["| method | pattern | layers | perplexity | sparsity (all layers) | prune s | s per round | "
          "peak memory | MLP rel. error round 1 -> kept | layers worse than round 1 | "
          "objective last / first |",
          "|---|---|---|---|---|---|---|---|---|---|---|",
          f"| dense | - | - | {d['ppl']:.2f} | {d['sparsity']:.2%} | | | | | | |"]
    for r in rows:
        err = worse = ratio = per_round = ""
        if r["method"] == "sparsellm":
            err = f"{r['mlp_relative_error_round1']:.4f} -> {r['mlp_relative_error_last']:.4f}"
            layers = r["layers"].values()
            worse = (f"{sum(v['rounds'][v['kept_round']]['relative'] > v['rounds'][0]['relative'] for v in layers)}"
                     f" of {len(layers)}")
            ratio = f"{np.mean([v['rounds'][-1]['before'] / v['rounds'][0]['before'] for v in layers]):.3f}"
            per_round = f"{r['seconds_per_round']:.2f}"
        md.append(f"| {_label(r)} | {r['pattern']} | {r['scope']} | {r['ppl']:.2f} | "
                  f"{r['measured_sparsity']:.2%} | {r['prune_s']:.1f} | {per_round} | "
                  f"{r['peak_memory_bytes'] / 2**30:.2f} GiB | {err} | {worse} | {ratio} |")
    md += ["", f"{args.model} ({setup.loaded.source}) on {report['machine']['cpu']}; calibration c4 "
               f"{args.nsamples} x {args.seqlen}, seed {args.seed}; {setup.protocol.describe()}. "
               f"One process, rows one after the other (load average per row in the JSON, highest "
               f"{max(r['loadavg'][0] for r in rows):.2f}; the benchmark itself keeps about 2 on 2 "
               f"cores). SparseLLM: alpha = beta = gamma = 5; '4' = 4 rounds, 1 in "
               f"the second and the last two layers (the reference llama_sparsellm's schedule), "
               f"'8' = 8 rounds everywhere, 'keep-best' = the 4-round schedule keeping per layer the "
               f"round with the lowest true MLP error on the calibration batch (our departure; round "
               f"1 is SparseGPT); 'half' = the first {first_layers(num_layers, 0.5)} of {num_layers} "
               f"layers, the rest dense. 's per round' is the mean seconds of one SparseLLM round "
               f"(SparseGPT of gate, up and down included). 'Objective' is the relaxed SparseLLM "
               f"objective (all four terms) with the last round's pruned weights over that with "
               f"round 1's, averaged over the pruned layers; the MLP error is the true one, "
               f"||Y - MLP_pruned(X)||^2 / ||Y||^2."]
    write_results(args.out, report, "\n".join(md) + "\n", quiet=quiet)


def _row(setup, method, variant, pattern, scope, num_layers, args, ab=None) -> dict:
    spec = spec_for(method, variant, pattern, scope, num_layers, args, ab)
    row, entry = prune_and_score(setup, spec)
    row.update(scope=scope, spec=spec, key=[method, variant, pattern, scope, ab],
               prune_s=row["prune_seconds"],
               measured_sparsity=row["sparsity"], timings=entry.get("timings", {}),
               loadavg=list(os.getloadavg()))
    n, m = map(int, pattern.split(":")) if ":" in pattern else (0, 0)
    row["sparsity"] = n / m if m else float(pattern)  # the asked one; measured_sparsity beside it
    if method == "sparsellm":
        row["rounds"] = int(variant) if variant.isdigit() else variant
        layers = entry["layers"]
        row["mlp_relative_error_round1"] = float(np.mean(
            [r["rounds"][0]["relative"] for r in layers.values()]))
        row["mlp_relative_error_last"] = float(np.mean(
            [r["rounds"][r["kept_round"]]["relative"] for r in layers.values()]))
        row["seconds_per_round"] = float(np.mean(
            [x["seconds"] for r in layers.values() for x in r["rounds"]]))
        row["layers"] = {str(k): v for k, v in layers.items()}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patterns", default="0.7,0.8,0.9", help="unstructured sparsities and N:M patterns")
    p.add_argument("--scopes", default="all", help="all layers and/or the first half (all,half)")
    p.add_argument("--variants", default="4,best,8", help="SparseLLM variants: 4, 8, best")
    p.add_argument("--alphas", default="", help="SparseLLM alpha grid, e.g. 0.1,1,10 (default: 5)")
    p.add_argument("--betas", default="", help="SparseLLM beta grid, e.g. 0.1,1,10 (default: 5)")
    p.add_argument("--no-sparsegpt", action="store_true", help="SparseLLM rows only")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows an earlier run of the same settings wrote to --out")
    p.add_argument("--paper-protocol", action="store_true",
                   help="the paper's setting (module docstring): first half of the layers, 32 x "
                        "2048, alpha x beta grid at 80%%, the best pair at 70/90%%")
    add_pruning_args(p, "sparsellm.json")
    args = p.parse_args(argv)
    if args.paper_protocol:
        return paper_protocol(args)

    jobs = _jobs(args)
    setup = prepare_pruning(args)
    num_layers = setup.loaded.model.config.num_layers
    rows = []
    done = _resumed_rows(args, setup) if args.resume else {}
    for method, variant, pattern, scope, ab in jobs:
        if _key(method, variant, pattern, scope, ab) in done:
            rows.append(done[_key(method, variant, pattern, scope, ab)])
            print(f"{method:9s} {variant or '-':4s} {pattern:>4s} {scope:4s} {ab}  (from {args.out})",
                  flush=True)
            continue
        row = _row(setup, method, variant, pattern, scope, num_layers, args, ab)
        rows.append(row)
        extra = (f"  MLP rel. error {row['mlp_relative_error_round1']:.4f} -> "
                 f"{row['mlp_relative_error_last']:.4f}  {row['seconds_per_round']:.2f} s/round"
                 if method == "sparsellm" else "")
        print(f"{method:9s} {variant or '-':4s} {row['pattern']:>4s} {scope:4s} {ab or ''}  ppl {row['ppl']:10.3f}  "
              f"sparsity {row['measured_sparsity']:.4f}  {row['prune_s']:7.1f} s  peak "
              f"{row['peak_memory_bytes'] / 2**30:.2f} GiB  load {row['loadavg'][0]:.1f}{extra}", flush=True)
        _write(args, setup, num_layers, rows, quiet=True)  # a cut-off run keeps its rows
    _write(args, setup, num_layers, rows)
    return 0


PAPER_SETTINGS = {"scopes": "half", "variants": "4", "nsamples": 32, "seqlen": 2048}
PAPER_GRID = "0.1,1,10"
PAPER_KEY = "paper_protocol"


def best_pair(rows, pattern: str = "0.8") -> tuple[float, float] | None:
    """The (alpha, beta) of the SparseLLM row with the lowest perplexity at `pattern` (as the
    job key spells it, "0.8"; a row's own `pattern` reads "80%")."""
    grid = [r for r in rows if r["method"] == "sparsellm" and r["key"][2] == pattern]
    if not grid:
        return None
    best = min(grid, key=lambda r: r["ppl"])
    return (float(best["spec"]["alpha"]), float(best["spec"]["beta"]))


def paper_jobs(args, rows) -> list[tuple]:
    """The paper protocol's jobs given the rows measured so far: SparseGPT and the alpha x beta grid
    at 80%; once the grid is complete, SparseGPT and the best pair at 70% and 90%."""
    grid = _grid(args)
    jobs = [("sparsegpt", None, "0.8", "half", None)] + [
        ("sparsellm", "4", "0.8", "half", ab) for ab in grid]
    done = {_key(*r["key"]) for r in rows}
    if all(_key(*j) in done for j in jobs):
        ab = best_pair(rows)
        for pattern in ("0.7", "0.9"):
            jobs += [("sparsegpt", None, pattern, "half", None), ("sparsellm", "4", pattern, "half", ab)]
    return jobs


def paper_summary(rows) -> dict:
    """Per sparsity: SparseGPT's perplexity, the best pair's, and whether SparseLLM is below (the
    paper's ordering); the 80% grid as {alpha: {beta: ppl}}."""
    ab = best_pair(rows)
    by = {(r["method"], r["key"][2], None if r["method"] == "sparsegpt" else
           (float(r["spec"]["alpha"]), float(r["spec"]["beta"]))): r["ppl"] for r in rows}
    out = {"best_pair": None if ab is None else {"alpha": ab[0], "beta": ab[1]}, "by_sparsity": {},
           "grid_80": {}}
    for r in rows:
        if r["method"] == "sparsellm" and r["key"][2] == "0.8":
            out["grid_80"].setdefault(f"{r['spec']['alpha']:g}", {})[f"{r['spec']['beta']:g}"] = r["ppl"]
    for pattern in ("0.7", "0.8", "0.9"):
        sg, sl = by.get(("sparsegpt", pattern, None)), by.get(("sparsellm", pattern, ab))
        if sg is not None and sl is not None:
            out["by_sparsity"][pattern] = {"sparsegpt": sg, "sparsellm": sl,
                                           "sparsellm_below_sparsegpt": sl < sg,
                                           "relative": sl / sg - 1}
    return out


def _paper_write(args, setup, num_layers, rows, quiet=False) -> None:
    import json

    from nnxprune.io import atomic
    from nnxprune.transforms.sparsellm import first_layers

    k = first_layers(num_layers, 0.5)
    for r in rows:
        r.update(scope="first_half", pruned_layers=f"0-{k - 1} of {num_layers}")
    section = pruning_report("sparsellm-paper-protocol", args, setup, variants=VARIANTS,
                             dense=setup.dense_row, rows=rows, summary=paper_summary(rows),
                             setting=(f"Bai et al. 2024's protocol: the first {k} of {num_layers} "
                                      f"decoder layers pruned, the rest dense; c4 {args.nsamples} x "
                                      f"{args.seqlen}; SparseLLM's 4-round schedule with alpha, beta "
                                      f"over {args.alphas or PAPER_GRID} x {args.betas or PAPER_GRID} "
                                      "at 80%, the best pair by perplexity at 70% and 90%; "
                                      "SparseGPT on the same layers"))
    path = Path(args.out)
    whole = json.loads(path.read_text()) if path.exists() else {}
    whole[PAPER_KEY] = section
    s = section["summary"]
    betas = sorted({b for v in s["grid_80"].values() for b in v}, key=float)
    md = [f"SparseLLM paper protocol on {args.model}: {section['setting']}. {setup.protocol.describe()}; "
          f"dense {setup.dense_row['ppl']:.2f}.", "", "Perplexity at 80%:", "",
          "| alpha \\ beta | " + " | ".join(betas) + " |", "|---" * (len(betas) + 1) + "|"]
    for a in sorted(s["grid_80"], key=float):
        md.append(f"| {a} | " + " | ".join(f"{s['grid_80'][a].get(b, float('nan')):.2f}" for b in betas) + " |")
    md += ["", "| sparsity | SparseGPT | SparseLLM (best pair) | SparseLLM / SparseGPT - 1 |",
           "|---|---|---|---|"]
    for pattern, v in s["by_sparsity"].items():
        md.append(f"| {float(pattern):.0%} | {v['sparsegpt']:.2f} | {v['sparsellm']:.2f} | "
                  f"{v['relative']:+.1%} |")
    md.append("")
    md.append(f"Best pair at 80%: {s['best_pair']}.")
    if not quiet:
        print("\n".join(md))
    atomic.write_json(path, whole)
    atomic.write_text(path.with_name(path.stem + "_paper_protocol.md"), "\n".join(md) + "\n")


def paper_protocol(args) -> int:
    """`--paper-protocol` (module docstring)."""
    import json

    for k, v in PAPER_SETTINGS.items():
        setattr(args, k, v)
    args.alphas, args.betas = args.alphas or PAPER_GRID, args.betas or PAPER_GRID
    _grid(args)  # bad values end here, before the model loads
    setup = prepare_pruning(args)
    num_layers = setup.loaded.model.config.num_layers
    rows, path = [], Path(args.out)
    if args.resume and path.exists():
        old = json.loads(path.read_text()).get(PAPER_KEY)
        if old is not None:
            if not _same_settings(old, args, setup):
                raise SystemExit(f"--resume: {path}'s {PAPER_KEY} was written with other settings")
            rows = old["rows"]
    while True:
        done = {_key(*r["key"]) for r in rows}
        todo = [j for j in paper_jobs(args, rows) if _key(*j) not in done]
        if not todo:
            break
        method, variant, pattern, scope, ab = todo[0]
        row = _row(setup, method, variant, pattern, scope, num_layers, args, ab)
        rows.append(row)
        print(f"{method:9s} {pattern:>4s} {ab or ''}  ppl {row['ppl']:10.3f}  {row['prune_s']:7.1f} s  "
              f"load {row['loadavg'][0]:.1f}", flush=True)
        _paper_write(args, setup, num_layers, rows, quiet=True)
    _paper_write(args, setup, num_layers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
