"""FLAP rows for benchmarks/results/beyond.json: SmolLM2-135M at ~20% of the parameters removed,
beside Wanda-sp rerun in the same process on the same protocol (no retraining for either).

    OPENBLAS_NUM_THREADS=1 NNXPRUNE_DATA_DIR=../shared/data python benchmarks/beyond_flap.py
    python benchmarks/beyond_flap.py --merge-only      # re-merge the saved rows into beyond.json

Rows (each on a copy of the dense model, with its recipe's own calibration draw):
- `recipes/flap.toml`: the paper's main setting (WIFV, adaptive AL-AM, bias compensation),
  ratio 0.25 of the attention + MLP weights = 19.7% of all parameters;
- the same without the bias compensation (`prune.0.bias=false`), the paper's ablation;
- `recipes/flap-ul-um.toml`: the uniform structure (UL-UM), which removes exactly what Wanda-sp's
  recipe removes (511 of 1536 neurons per layer), so the two differ by metric and bias only;
- `recipes/wanda-sp.toml`, rerun here so that the orderings are read from one run.

The three FLAP rows share one calibration draw (their recipes' calibration sections are equal) and
so the dense model's statistics: the pass runs once (1024 x 128 tokens, ~25 min on the shared
2-core machine), and each FLAP row's `prune_s` is that pass's time plus its own allocation,
compensation and surgery (`stats_s`, `own_s` recorded beside it).

The protocol is beyond.json's when it exists (else `benchmarks/beyond.py`'s default: WikiText-2
test, 1024-token windows, first 8). Writes `results/beyond_flap.json` (rows, protocol, machine)
and merges its `flap` rows into `results/beyond.json` (other rows kept, the file rewritten
atomically); refuses to merge across protocols. beyond.py writes beyond.json whole, so after it
runs, `--merge-only` puts the FLAP rows back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine_info  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# (method, setting, recipe, overrides)
RUNS = [
    ("flap", "WIFV, AL-AM, bias, ratio 0.25", "flap", ()),
    ("flap", "WIFV, AL-AM, no bias, ratio 0.25", "flap", ("prune.0.bias=false",)),
    ("flap", "WIFV, UL-UM, bias, ratio 0.333", "flap-ul-um", ()),
    ("wanda-sp", "ratio 0.333, uniform (rerun beside FLAP)", "wanda-sp", ()),
]


def allocation(log: list[dict]) -> dict | None:
    """Per-layer KV groups and neurons kept, from the FLAP transform's log entry."""
    entry = next((t for t in log if t.get("kind") == "flap"), None)
    if entry is None:
        return None
    kept = entry["kept"]
    return {"kv_kept": [kept[k]["kv"][1] for k in kept], "mlp_kept": [kept[k]["mlp"][1] for k in kept]}


def flap_rows(loaded, windows, protocol, data_dir) -> list[dict]:
    """The FLAP rows of `RUNS` from one statistics pass over their shared calibration draw."""
    from flax import nnx

    from nnxprune.calibration.sequential import collect_statistics
    from nnxprune.data import calibration_samples
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.measure import count_params
    from nnxprune.recipes import load_recipe
    from nnxprune.scoring.flap import InputMoments
    from nnxprune.transforms import Context

    runs = [(m, s, load_recipe(RECIPES / f"{n}.toml", list(o)), n, o) for m, s, n, o in RUNS
            if m == "flap"]
    c = runs[0][2].calibration
    if any(r.calibration != c for _, _, r, _, _ in runs):
        raise SystemExit("the FLAP recipes' calibration sections differ: they cannot share statistics")
    tokens = calibration_samples(loaded.tokenizer, dataset=c.dataset, nsamples=c.nsamples,
                                 seqlen=c.seqlen, seed=c.seed, data_dir=data_dir).tokens
    t0 = time.perf_counter()
    stats = collect_statistics(loaded.model, tokens, (InputMoments(),), desc="flap statistics")
    stats_s = time.perf_counter() - t0
    print(f"FLAP statistics over {tokens.size:,} tokens: {stats_s:.0f} s", flush=True)
    rows = []
    for method, setting, recipe, name, overrides in runs:
        (step,) = recipe.pipeline.steps
        step.check(loaded.model.config)
        model, ctx = nnx.clone(loaded.model), Context(tokens=tokens, progress=False)
        t0 = time.perf_counter()
        step.prune(model, stats, ctx, calibration_tokens=int(tokens.size))
        own_s = time.perf_counter() - t0
        rows.append({"method": method, "setting": setting, "params": count_params(model),
                     "ppl": score_windows(model, windows, protocol, progress=False).ppl,
                     "ppl_after": None, "prune_s": stats_s + own_s, "stats_s": stats_s,
                     "own_s": own_s, "layers": model.config.num_layers,
                     "calibration": {"dataset": c.dataset, "nsamples": c.nsamples,
                                     "seqlen": c.seqlen, "seed": c.seed},
                     "allocation": allocation(ctx.report.get("transforms", [])),
                     "source": f"measured: recipes/{name}.toml"
                               + (f" --set {' '.join(overrides)}" if overrides else "")
                               + " (benchmarks/beyond_flap.py)"})
        print(f"flap ({setting}): {rows[-1]['params']:,} params, ppl {rows[-1]['ppl']:.2f}",
              flush=True)
        del model
    return rows


def run(loaded, name: str, overrides, windows, protocol, data_dir) -> dict:
    from flax import nnx

    from nnxprune.data import calibration_samples
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.measure import count_params
    from nnxprune.recipes import load_recipe
    from nnxprune.transforms import Context

    recipe = load_recipe(RECIPES / f"{name}.toml", list(overrides))
    c = recipe.calibration
    tokens = calibration_samples(loaded.tokenizer, dataset=c.dataset, nsamples=c.nsamples,
                                 seqlen=c.seqlen, seed=c.seed, data_dir=data_dir).tokens
    recipe.pipeline.check(loaded.model.config)
    model = nnx.clone(loaded.model)
    ctx = Context(tokens=tokens, progress=True)
    t0 = time.perf_counter()
    recipe.pipeline(model, ctx)
    seconds = time.perf_counter() - t0
    log = ctx.report.get("transforms", [])
    return {"params": count_params(model), "ppl": score_windows(model, windows, protocol,
                                                                progress=False).ppl,
            "ppl_after": None, "prune_s": seconds, "layers": model.config.num_layers,
            "calibration": {"dataset": c.dataset, "nsamples": c.nsamples, "seqlen": c.seqlen,
                            "seed": c.seed},
            "allocation": allocation(log),
            "source": f"measured: recipes/{name}.toml" + (f" --set {' '.join(overrides)}"
                                                          if overrides else "")
                      + " (benchmarks/beyond_flap.py)"}


def merge(ours: dict, target: Path) -> None:
    """Puts `ours`' FLAP rows into `target` (beyond.json), replacing earlier FLAP rows."""
    from nnxprune.io import atomic

    if not target.exists():
        print(f"{target} does not exist yet: rows kept in beyond_flap.json only")
        return
    report = json.loads(target.read_text())
    if report.get("protocol") != ours["protocol"]:
        raise SystemExit(f"{target} was measured on another protocol; not merged")
    flap = [r for r in ours["rows"] if r["method"] == "flap"]
    report["rows"] = [r for r in report["rows"] if r["method"] != "flap"] + flap
    report["flap"] = {"file": "benchmarks/results/beyond_flap.json", "date": ours["date"],
                      "machine": ours["machine"], "wall_seconds": ours["wall_seconds"]}
    atomic.write_json(target, report)
    md = target.with_suffix(".md")
    if md.exists():  # beyond.py's table, with the FLAP rows appended in its columns
        dense = report["rows"][0]["params"]
        lines = [line for line in md.read_text().splitlines() if not line.startswith("| flap |")]
        at = max(i for i, line in enumerate(lines) if line.startswith("|")) + 1
        lines[at:at] = [f"| flap | {r['setting']} | {r['params'] / 1e6:.1f}M | "
                        f"{1 - r['params'] / dense:.1%} | {r['ppl']:.2f} | - | {r['prune_s']:.0f} | "
                        f"{r['source']} |" for r in flap]
        atomic.write_text(md, "\n".join(lines) + "\n")
    print(f"merged {len(flap)} FLAP rows into {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=str(RESULTS / "beyond_flap.json"))
    parser.add_argument("--into", default=str(RESULTS / "beyond.json"))
    parser.add_argument("--merge-only", action="store_true")
    args = parser.parse_args()
    if args.merge_only:
        merge(json.loads(Path(args.out).read_text()), Path(args.into))
        return
    import datetime

    from nnxprune import data as data_lib
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.evaluate.protocol import PerplexityProtocol, protocol_for
    from nnxprune.io import atomic
    from nnxprune.io.load import load_model
    from nnxprune.measure import count_params

    t_start = time.perf_counter()
    into = Path(args.into)
    protocol = (PerplexityProtocol.from_dict(json.loads(into.read_text())["protocol"]) if into.exists()
                else protocol_for("wikitext2", seqlen=1024, max_windows=8))
    loaded = load_model(args.model)
    data_dir = data_lib.resolve_data_dir(None)
    windows = data_lib.windows(data_lib.token_stream(protocol, loaded.tokenizer, data_dir), protocol)
    rows = [{"method": "dense", "setting": "-", "params": count_params(loaded.model),
             "ppl": score_windows(loaded.model, windows, protocol, progress=False).ppl,
             "ppl_after": None, "prune_s": 0.0, "source": "measured (benchmarks/beyond_flap.py)"}]
    print(f"dense: ppl {rows[0]['ppl']:.2f}", flush=True)
    rows += flap_rows(loaded, windows, protocol, data_dir)
    atomic.write_json(Path(args.out).with_suffix(".partial.json"), {"rows": rows})
    for method, setting, name, overrides in [r for r in RUNS if r[0] != "flap"]:
        row = {"method": method, "setting": setting, **run(loaded, name, overrides, windows,
                                                           protocol, data_dir)}
        rows.append(row)
        print(f"{method} ({setting}): {row['params']:,} params, ppl {row['ppl']:.2f}, pruned in "
              f"{row['prune_s']:.0f} s", flush=True)
        atomic.write_json(Path(args.out).with_suffix(".partial.json"), {"rows": rows})
    report = {"benchmark": "beyond_flap", "model": args.model, "source": loaded.source,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": dict(machine_info(), loadavg_end=list(os.getloadavg())),
              "protocol": protocol.to_dict(), "protocol_text": protocol.describe(), "rows": rows,
              "wall_seconds": time.perf_counter() - t_start}
    atomic.write_json(args.out, report)
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)
    merge(report, into)


if __name__ == "__main__":
    main()
