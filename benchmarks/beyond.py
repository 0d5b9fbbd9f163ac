"""Beyond the collection: SLEB, Shortened LLaMA and Wanda-sp on SmolLM2-135M at ~20% of the
parameters removed, beside ShortGPT, Minitron and LLM-Pruner.

    OPENBLAS_NUM_THREADS=1 NNXPRUNE_DATA_DIR=../shared/data python benchmarks/beyond.py

Each method runs its own recipe (`recipes/sleb.toml`, `shortened-ppl-lora.toml`,
`shortened-taylor-lora.toml`, `shortened-ppl-cpt.toml`, `wanda-sp.toml`) on a copy of the dense
model with the recipe's own calibration draw, and is scored on the structured table's protocol
(WikiText-2 test, 1024-token windows, first 32). Where the recipe has a `[recovery]` section
(Shortened LLaMA's LoRA and continued pretraining) it trains a copy of the pruned model and scores
it again (`ppl_after`); the PPL-criterion recipes prune identically, so their pruned model is
shared. Recovery is CPU-sized: the recipes' 12 steps of 4 x 256 C4 tokens (`--steps` overrides).

Baselines: ShortGPT, Minitron depth and Minitron width are cited from
`results/structured.json` (same model, protocol and parameter count for the depth methods;
its width row removes 41%, so Minitron width is also run here at MLP 1536 -> 1024, 19.7%, one
transform on the structured table's C4 32 x 1024 draw, no recipe sets it), and
LLM-Pruner element1 from `results/llm_pruner.json` (its table scores 8 windows, not 32, so it is
rerun here on this protocol with `recipes/llm-pruner-element1.toml`). Rerun rows say so.

Writes `benchmarks/results/beyond.json` (`rows`: `method`, `setting`, `params`, `ppl`, `ppl_after`
where there is recovery, `prune_s`, `source`) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine_info, write_results  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# (method, setting, recipe); recipes with the same [[prune]] share their pruned model
METHODS = [
    ("sleb", "iterative PPL, 8 blocks", "sleb"),
    ("shortened-llama", "PPL, LoRA", "shortened-ppl-lora"),
    ("shortened-llama", "PPL, CPT", "shortened-ppl-cpt"),
    ("shortened-llama", "Taylor+, LoRA", "shortened-taylor-lora"),
    ("wanda-sp", "ratio 0.333, uniform", "wanda-sp"),
    ("minitron-width", "MLP 1536 -> 1024, activation", "minitron-width-mlp1024"),
]
# baselines at the matched count that no recipe sets: one transform on C4 32 x 1024 (run_recipe)
SPECS = {"minitron-width-mlp1024": {"kind": "width", "score": "activation", "intermediate": 1024}}
# depth baselines of results/structured.json, re-scored on this protocol by their recorded layers
RESCORED = [("shortgpt", "block influence, 8 blocks", "shortgpt"),
            ("minitron-depth", "block search, 8 blocks", "minitron-depth")]


def _same(report_protocol, protocol) -> str:
    return "same protocol" if report_protocol == protocol.to_dict() else "another protocol"


def cited_rows(protocol) -> list[dict]:
    """Rows quoted from the earlier tables, each labelled with its protocol."""
    out = []
    structured = json.loads((RESULTS / "structured.json").read_text())
    where = f"cited: benchmarks/results/structured.json ({structured['protocol_text']})"
    for r in structured["rows"]:
        if r["recipe"] in ("shortgpt", "minitron-depth", "minitron-width"):
            out.append({"method": r["recipe"], "setting": "as in structured.json, distilled",
                        "params": r["params"], "ppl": r["ppl"], "ppl_after": r.get("ppl_after"),
                        "prune_s": r.get("prune_seconds"),
                        "recovery": "logit distillation, 12 steps x 4 x 256",
                        "source": f"{where}; {_same(structured['protocol'], protocol)}"})
    llmp = json.loads((RESULTS / "llm_pruner.json").read_text())
    same = _same(llmp["protocols"]["ppl"], protocol)
    rows = {r.get("variant"): r for r in llmp["rows"]}
    if "dense" in rows:
        out.insert(0, {"method": "dense", "setting": "-", "params": rows["dense"]["params"],
                       "ppl": rows["dense"]["ppl"], "ppl_after": None, "prune_s": 0.0,
                       "source": f"cited: benchmarks/results/llm_pruner.json; {same}"})
    for variant, after in (("element1", None), ("element1-lora", "ppl_after")):
        if variant in rows:
            r = rows[variant]
            out.append({"method": "llm-pruner", "setting": f"{variant}, ratio 0.34, heads q",
                        "params": r["params"], "ppl": r["ppl"],
                        "ppl_after": r.get(after) if after else None,
                        "prune_s": r.get("prune_seconds"),
                        "recovery": (f"LoRA {r.get('lora_steps')} steps x 4 x 256" if after else None),
                        "source": f"cited: benchmarks/results/llm_pruner.json; {same}"})
    return out


def rescored_rows(loaded, windows, protocol) -> list[dict]:
    """ShortGPT and Minitron depth: the layers structured.json records as dropped, removed from
    the dense model and scored on this protocol (no calibration needed: the choice is recorded)."""
    from flax import nnx

    from nnxprune import graph
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.measure import count_params

    structured = {r["recipe"]: r for r in json.loads((RESULTS / "structured.json").read_text())["rows"]}
    out = []
    for method, setting, recipe in RESCORED:
        row = structured[recipe]
        dropped = next(t["dropped"] for t in row["transforms"] if t["kind"] == "depth")
        model = nnx.clone(loaded.model)
        graph.drop_layers(model, dropped)
        ppl = score_windows(model, windows, protocol, progress=False).ppl
        out.append({"method": method, "setting": f"{setting} (layers {dropped})",
                    "params": count_params(model), "ppl": ppl, "ppl_after": None,
                    "prune_s": row.get("prune_seconds"),
                    "source": "measured: layers recorded in benchmarks/results/structured.json, "
                              "re-scored here (prune_s cited)"})
        print(f"{method}: ppl {ppl:.2f}", flush=True)
    return out


def run_recipe(loaded, name: str | None, spec: dict | None, data_dir):
    """Prunes a copy of the dense model by recipe `name` (or one transform `spec` on the shared
    C4 32 x 1024 draw); returns (model, seconds, transform log, recipe)."""
    from flax import nnx

    from nnxprune.data import calibration_samples
    from nnxprune.recipes import load_recipe
    from nnxprune.transforms import Context, from_dict

    recipe = load_recipe(RECIPES / f"{name}.toml") if name else None
    pipeline = recipe.pipeline if recipe else from_dict(spec)
    c = recipe.calibration if recipe else None
    ds, n, t, seed = (c.dataset, c.nsamples, c.seqlen, c.seed) if c else ("c4", 32, 1024, 0)
    tokens = calibration_samples(loaded.tokenizer, dataset=ds, nsamples=n, seqlen=t, seed=seed,
                                 data_dir=data_dir).tokens
    pipeline.check(loaded.model.config)
    model = nnx.clone(loaded.model)
    ctx = Context(tokens=tokens, progress=True)  # progress bars on stderr
    t0 = time.perf_counter()
    pipeline(model, ctx)
    return model, time.perf_counter() - t0, ctx.report.get("transforms", []), recipe, (ds, n, t, seed)


def recover_copy(loaded, model, recipe, steps, data_dir):
    from flax import nnx

    from nnxprune.recipes import load_recipe
    from nnxprune.recovery.run import recover

    cfg = recipe.recovery
    if steps:
        cfg = load_recipe(RECIPES / f"{recipe.name}.toml", [f"recovery.steps={steps}"]).recovery
    student = nnx.clone(model)
    entry = recover(student, cfg, tokenizer=loaded.tokenizer, data_dir=data_dir, progress=False,
                    echo=lambda *a: None)
    return student, entry, cfg


def markdown(report: dict) -> str:
    md = ["| method | setting | params | removed | WikiText-2 ppl | after recovery | prune s | source |",
          "|---|---|---|---|---|---|---|---|"]
    dense = report["rows"][0]["params"]
    for r in report["rows"]:
        after = "-" if r.get("ppl_after") is None else f"{r['ppl_after']:.2f}"
        prune = "-" if r.get("prune_s") is None else f"{r['prune_s']:.0f}"
        md.append(f"| {r['method']} | {r['setting']} | {r['params'] / 1e6:.1f}M | "
                  f"{1 - r['params'] / dense:.1%} | {r['ppl']:.2f} | {after} | {prune} | {r['source']} |")
    md += ["", f"Protocol: {report['protocol_text']}. Recovery (Shortened LLaMA): {report['recovery']}.",
           f"Machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} cores; "
           f"whole benchmark {report['wall_seconds'] / 60:.1f} min.", ""]
    return "\n".join(md)


def merge(args) -> None:
    """Writes --out from the reports of runs over parts of the methods (same protocol)."""
    parts = [dict(json.loads(Path(f).read_text()), file=str(f)) for f in args.merge]
    full = [p for p in parts if "protocol" in p]  # a .partial.json holds rows only
    if not full or len({json.dumps(p["protocol"], sort_keys=True) for p in full}) != 1:
        raise SystemExit("merge needs at least one finished run, and one protocol")
    for p in parts:
        p.setdefault("wall_seconds", None)
        p.setdefault("recovery", "none run")
        p.setdefault("date", None)
        p.setdefault("machine", None)
    parts.sort(key=lambda p: "protocol" not in p)
    measured = [r for p in parts for r in p["rows"] if r["source"].startswith("measured")]
    order = [m[0] for m in RESCORED] + [m[1] for m in METHODS]
    measured.sort(key=lambda r: order.index(r["method"] if r["method"] in ("shortgpt", "minitron-depth")
                                            else r["setting"]))
    cited = [r for r in parts[0]["rows"] if not r["source"].startswith("measured")]
    report = dict(parts[0], rows=cited + measured,
                  recovery=next((p["recovery"] for p in parts if p["recovery"] != "none run"),
                                "none run"),
                  wall_seconds=max(p["wall_seconds"] or 0 for p in parts),  # side by side
                  parts=[q for p in parts for q in p.get("parts") or [  # earlier merges kept
                      {"file": p["file"], "date": p["date"], "wall_seconds": p["wall_seconds"],
                       "machine": p["machine"]}]])
    report.pop("file", None)
    write_results(args.out, report, markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="override recovery.steps")
    parser.add_argument("--recipes", nargs="+", default=[m[2] for m in METHODS])
    parser.add_argument("--baselines", action="store_true",
                        help="re-score ShortGPT and Minitron depth (recorded layers) on this protocol")
    parser.add_argument("--out", default=str(RESULTS / "beyond.json"))
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the measured rows of earlier runs (e.g. --recipes sleb in one "
                             "process, the rest in another) into --out, in METHODS order")
    args = parser.parse_args()
    if args.merge:
        merge(args)
        return
    t_start = time.perf_counter()

    import datetime

    from nnxprune import data as data_lib
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io import atomic
    from nnxprune.io.load import load_model
    from nnxprune.measure import count_params

    loaded = load_model(args.model)
    data_dir = data_lib.resolve_data_dir(None)
    protocol = protocol_for("wikitext2", seqlen=args.eval_seqlen, max_windows=args.eval_windows)
    windows = data_lib.windows(data_lib.token_stream(protocol, loaded.tokenizer, data_dir), protocol)
    rows = cited_rows(protocol)
    pruned: dict[str, tuple] = {}  # the [[prune]] steps -> (model, seconds, log, calibration)
    recovery_text = "none run"
    if args.baselines:
        rows += rescored_rows(loaded, windows, protocol)
    from nnxprune.recipes import load_recipe

    for method, setting, name in [m for m in METHODS if m[2] in args.recipes]:
        spec = SPECS.get(name)
        r = None if spec else load_recipe(RECIPES / f"{name}.toml")
        key = json.dumps(spec) if spec else json.dumps([r.pipeline.to_dict(), str(r.calibration)])
        if key not in pruned:
            model, seconds, log, recipe, calib = run_recipe(loaded, None if spec else name, spec,
                                                            data_dir)
            ppl = score_windows(model, windows, protocol, progress=False).ppl
            pruned[key] = (model, seconds, log, calib, ppl)
        model, seconds, log, calib, ppl = pruned[key]
        recipe = r
        row = {"method": method, "setting": setting, "params": count_params(model), "ppl": ppl,
               "ppl_after": None, "prune_s": seconds, "layers": model.config.num_layers,
               "calibration": dict(zip(("dataset", "nsamples", "seqlen", "seed"), calib)),
               "source": f"measured: {spec}" if spec else f"measured: recipes/{name}.toml",
               "transforms": log}
        print(f"{method} ({setting}): {row['params']:,} params, ppl {ppl:.2f}, pruned in "
              f"{seconds:.0f} s", flush=True)
        if recipe is not None and recipe.recovery is not None and method == "shortened-llama":
            student, entry, cfg = recover_copy(loaded, model, recipe, args.steps, data_dir)
            row["ppl_after"] = score_windows(student, windows, protocol, progress=False).ppl
            row["recovery"] = {"kind": cfg.kind, "steps": cfg.steps, "batch_size": cfg.batch_size,
                               "seqlen": cfg.seqlen, "lr": cfg.lr, "dataset": cfg.dataset,
                               "first_loss": entry.get("first_loss"),
                               "final_loss": entry.get("final_loss")}
            recovery_text = (f"{cfg.steps} steps x {cfg.batch_size} x {cfg.seqlen} tokens of C4 "
                             f"validation, lr {cfg.lr:g} (LoRA rank 8 / all weights for CPT)")
            print(f"  after {cfg.kind}: ppl {row['ppl_after']:.2f}", flush=True)
        rows.append(row)
        atomic.write_json(Path(args.out).with_suffix(".partial.json"), {"rows": rows})
    report = {"benchmark": "beyond", "model": args.model, "source": loaded.source,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(),
              "threads": {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
              "protocol": protocol.to_dict(), "protocol_text": protocol.describe(),
              "recovery": recovery_text, "rows": rows,
              "wall_seconds": time.perf_counter() - t_start}
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    write_results(args.out, report, markdown(report))
    Path(args.out).with_suffix(".partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
