"""Structured pruning benchmark: ShortGPT, Minitron depth and width, and a composed recipe on
SmolLM2-135M, before and after logit distillation, with the real speed-up of a smaller model.

    OPENBLAS_NUM_THREADS=1 NNXPRUNE_DATA_DIR=../shared/data python benchmarks/structured.py

For each recipe (`recipes/shortgpt.toml`, `minitron-depth.toml`, `minitron-width.toml`,
`shortgpt-wanda-2of4-distill.toml`): the pipeline runs on a copy of the dense model with the shared
calibration draw (c4 32 x 1024, seed 0), the result is scored on the pinned protocol (WikiText-2
test, 1024-token windows, first 32), then the `-distill` variant's `[recovery]` section (forward
KL at T = 1 from the dense model, no CE) trains it and it is scored again (a `-distill` recipe
prunes exactly as its base recipe, so the pruned model is shared). Speed: every model's evaluation
forward (the perplexity scorer, compiled once per model) is timed on the same windows, the models
interleaved round by round so that machine noise hits them alike; medians, beside the ratio of
forward matmul FLOPs. Importance cost: one calibration pass gathering block influence and the
activation statistics, against the evaluation forward of the same calibration tokens.

Writes `benchmarks/results/structured.json` (`rows`, one per recipe, each with `recipe`, `params`,
`ppl`, `ppl_after` where a distillation ran, `tokens_per_s`) and a Markdown table beside it.

`--compare-distill` (issue 30) instead adds rows to the existing results, keeping every row there:
Minitron width and depth, each pruned once, then distilled twice from the same pruned model at
the same token budget, logit-only (`recovery.distill.intermediate = false`) and logit +
intermediate (ModelOpt's cosine loss on paired norm outputs, rescaled to the logit loss; the
width student through its projections), teacher correction off in both; each row has a `distill`
key, `"logit"` or `"logit+intermediate"`, and its `distill_tokens`.

    nice -n 10 python benchmarks/structured.py --compare-distill --steps 6 --nsamples 8 \
        --eval-windows 8 --dense-from-sparsity
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (add_pruning_args, median, prepare_pruning,  # noqa: E402
                    pruning_report, write_results)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STRUCTURED = ("shortgpt", "minitron-depth", "minitron-width", "shortgpt-wanda-2of4-distill")


def forward_flops(config, seqlen: int) -> float:
    """Matmul FLOPs of one evaluation forward per token at `seqlen` (projections, the output
    head, and causal attention's score and value products, half the square on average)."""
    d, dh = config.hidden_size, config.head_dim
    total = 2 * config.vocab_size * d
    for s in config.layers:
        total += 2 * d * dh * (2 * s.num_heads + 2 * s.num_kv_heads) + 6 * d * s.intermediate_size
        total += 2 * s.num_heads * dh * seqlen  # QK^T and PV, causal: 2 * 2 * H * dh * T / 2
    return float(total)


def time_forwards(models: dict, windows, protocol, rounds: int) -> dict[str, float]:
    """Median evaluation tokens/s per model, the models interleaved round by round."""
    import jax.numpy as jnp

    from nnxprune.evaluate.perplexity import compile_scorer

    bs = min(protocol.batch_size, len(windows))
    compiled = {name: compile_scorer(m, bs, windows.shape[1]) for name, m in models.items()}
    weight = jnp.ones((bs,), jnp.float32)
    batches = [jnp.asarray(windows[i:i + bs], jnp.int32) for i in range(0, len(windows) - bs + 1, bs)]
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, (fn, state) in compiled.items():
            t0 = time.perf_counter()
            for b in batches:
                float(fn(state, b, weight))
            times[name].append(time.perf_counter() - t0)
    tokens = len(batches) * bs * windows.shape[1]
    return {name: tokens / median(t) for name, t in times.items()} | {"_tokens": tokens,
                                                                      "_raw": times}


def importance_cost(setup, batch_size: int) -> dict:
    """One calibration pass (block influence + activation) against the evaluation forward of the
    same calibration tokens."""
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.inspect.importance import importance

    tokens = setup.calib.tokens
    timings = []
    for _ in range(2):  # the first pass compiles
        report = importance(setup.loaded.model, tokens, ["block_influence", "activation"],
                            batch_size=batch_size, progress=False)
        timings.append(report["seconds"])
    forward = score_windows(setup.loaded.model, tokens, setup.protocol, progress=False)
    return {"importance_seconds": timings[-1], "importance_first_seconds": timings[0],
            "forward_seconds": forward.seconds, "ratio": timings[-1] / forward.seconds,
            "tokens": int(tokens.size)}


def prune(setup, name: str):
    from flax import nnx

    from nnxprune.recipes import load_recipe
    from nnxprune.transforms import Context

    recipe = load_recipe(RECIPES / f"{name}.toml")
    recipe.check(setup.loaded.model.config)
    model = nnx.clone(setup.loaded.model)
    ctx = Context(tokens=setup.calib.tokens, progress=False)
    t0 = time.perf_counter()
    recipe.pipeline(model, ctx)
    return model, time.perf_counter() - t0, ctx.report.get("transforms", [])


def distill(setup, model, recipe_name: str, steps: int | None, log_dir: Path, extra=()):
    from flax import nnx

    from nnxprune import data as data_lib
    from nnxprune.recipes import load_recipe
    from nnxprune.recovery import train

    overrides = ([f"recovery.steps={steps}"] if steps else []) + list(extra)
    cfg = load_recipe(RECIPES / f"{recipe_name}.toml", overrides).recovery
    student = nnx.clone(model)
    result = train(student, cfg, tokenizer=setup.loaded.tokenizer, teacher=setup.loaded.model,
                   data_dir=data_lib.resolve_data_dir(None), log_dir=log_dir, progress=False,
                   echo=lambda *a: None)
    return student, result, cfg


MODES = {"logit": "false", "logit+intermediate": "true"}


def recorded_depth(setup, prior: dict, check: bool = False):
    """Minitron depth as the earlier `minitron-depth` row of `prior` pruned it: the dense model
    without the layers its block search dropped (the search, 23 candidates x 8 sequences, is the
    dearest step on a loaded 2-core machine). With `check`: whether such a row exists."""
    from flax import nnx

    from nnxprune import graph

    dropped = next((t["dropped"] for r in prior.get("rows", []) if r.get("recipe") ==
                    "minitron-depth" and "distill" not in r for t in r.get("transforms", [])
                    if t.get("kind") == "depth"), None)
    if check:
        return dropped is not None
    model = nnx.clone(setup.loaded.model)
    graph.drop_layers(model, dropped)
    return model, 0.0, (f"layers {dropped} dropped, as the block search of the minitron-depth "
                        f"row (calibration {prior['calibration']['nsamples']} x "
                        f"{prior['calibration']['seqlen']}) chose them")


def compare_distill(args, setup, prior: dict) -> list[dict]:
    """The issue-30 rows: Minitron width and depth, each distilled logit-only and logit +
    intermediate from the same pruned model at the same token budget."""
    import jax

    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.io import atomic
    from nnxprune.measure import count_params

    rows = []
    for name in ("minitron-width", "minitron-depth"):
        if name == "minitron-depth" and recorded_depth(setup, prior, check=True):
            model, seconds, how = recorded_depth(setup, prior)
        else:
            model, seconds, _ = prune(setup, name)
            how = "pruned here"
        before = score_windows(model, setup.windows, setup.protocol, progress=False).ppl
        print(f"{name}: ppl {before:.3f}, {how} ({seconds:.0f} s)", flush=True)
        for mode, flag in MODES.items():
            extra = [f"recovery.distill.intermediate={flag}",
                     "recovery.distill.teacher_correction_steps=0",
                     f"recovery.grad_accum={args.grad_accum}"]  # memory, not the budget
            log_dir = Path(args.out).with_suffix("") / f"{name}-distill-{mode.replace('+', '-')}"
            student, res, cfg = distill(setup, model, f"{name}-distill", args.steps, log_dir,
                                        extra)
            after = score_windows(student, setup.windows, setup.protocol, progress=False).ppl
            rows.append({
                "recipe": name, "distill": mode, "params": count_params(student),
                "layers": student.config.num_layers, "hidden": student.config.hidden_size,
                "ppl": before, "ppl_after": after, "distill_recipe": f"{name}-distill",
                "distill_overrides": extra, "distill_steps": res.steps,
                "distill_tokens": res.tokens, "batch_size": cfg.batch_size, "seqlen": cfg.seqlen,
                "lr": cfg.lr, "distill_seconds": res.seconds,
                "distill_tokens_per_s": res.tokens_per_second, "strategy": res.strategy,
                "distill_first_loss": res.losses[0], "distill_final_loss": res.losses[-1],
                "heldout": res.evals[-1] if res.evals else None,  # kl, ce (and intermediate)
                "prune_seconds": seconds, "pruning": how, "teacher_correction_steps": 0,
                "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                                "seed": args.seed},
                "protocol": setup.protocol.to_dict(), "protocol_text": setup.protocol.describe(),
                "device": jax.devices()[0].device_kind})
            print(f"  {mode}: ppl {after:.3f} after {res.steps} steps ({res.tokens:,} tokens, "
                  f"{res.seconds:.0f} s)", flush=True)
            atomic.write_json(Path(args.out).with_suffix(".compare.partial.json"), {"rows": rows})
            del student
    return rows


def comparison_markdown(rows: list[dict]) -> list[str]:
    """The logit vs logit + intermediate table (rows with a `distill` key)."""
    if not rows:
        return []
    md = ["", "Minitron distillation, logit-only against logit + intermediate (issue 30):", "",
          "| recipe | distill | params | WikiText-2 ppl pruned | after distillation | "
          "student tokens | distill s | held-out KL | held-out CE | held-out cosine loss |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r.get("heldout") or {}
        cos = f"{h['intermediate']:.4f}" if "intermediate" in h else "-"
        md.append(f"| {r['recipe']} | {r['distill']} | {r['params'] / 1e6:.1f}M | {r['ppl']:.2f} | "
                  f"{r['ppl_after']:.2f} | {r['distill_tokens']:,} | {r['distill_seconds']:.0f} | "
                  f"{h.get('kl', float('nan')):.4f} | {h.get('ce', float('nan')):.4f} | {cos} |")
    r = rows[0]
    md += ["", f"Same budget in every row: {r['distill_steps']} steps x {r['batch_size']} x "
           f"{r['seqlen']} tokens of C4 validation, AdamW lr {r['lr']:g}, teacher = the dense "
           f"model, no teacher correction. Perplexity: {r['protocol_text']}. Width pruned here "
           f"(calibration c4 {r['calibration']['nsamples']} x {r['calibration']['seqlen']}); "
           f"depth: {rows[-1]['pruning']}. logit: forward KL T=1; logit+intermediate: plus the "
           "cosine loss between the norm outputs of every kept layer and the final norm and "
           "their teacher layers (ModelOpt's pairs), rescaled to the KL by the detached ratio. "
           "The rows of the first table (no `distill` key) come from an earlier run, with the "
           "settings stated under it.", ""]
    return md


def markdown(report: dict) -> str:
    compared = [r for r in report["rows"] if "distill" in r]
    rows = [r for r in report["rows"] if "distill" not in r]
    dense = rows[0]
    md = ["| recipe | params | layers | hidden | WikiText-2 ppl | after distillation | "
          "prune s | eval tokens/s | speed-up | FLOP ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        after = "-" if r.get("ppl_after") is None else f"{r['ppl_after']:.2f}"
        md.append(f"| {r['recipe']} | {r['params'] / 1e6:.1f}M | {r['layers']} | {r['hidden']} | "
                  f"{r['ppl']:.2f} | {after} | {r.get('prune_seconds', 0):.0f} | "
                  f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / dense['tokens_per_s']:.2f}x | "
                  f"{dense['flops_per_token'] / r['flops_per_token']:.2f}x |")
    d = report["distillation"]
    imp = report["importance_cost"]
    dense_note = dense.get("ppl_source", "measured in this run")
    md += ["", f"Distillation: {d['steps']} steps x {d['batch_size']} x {d['seqlen']} tokens "
           f"({d['tokens']:,} student tokens) of C4 validation, forward KL T=1 from the dense model, "
           f"no CE, AdamW lr {d['lr']:g}.",
           f"Speed: evaluation forward ({report['protocol_text']}), {report['speed']['tokens']:,} "
           f"tokens per round, {report['speed']['rounds']} rounds interleaved, medians; FLOP ratio = "
           "dense forward matmul FLOPs / the model's.",
           f"Dense perplexity: {dense_note}.",
           "Importance cost: not measured in this run." if imp is None else
           f"Importance (block influence + activation, one calibration pass over {imp['tokens']:,} "
           f"tokens): {imp['importance_seconds']:.1f} s against {imp['forward_seconds']:.1f} s for "
           f"the evaluation forward of the same tokens ({imp['ratio']:.2f}x).",
           f"Machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} cores; "
           f"whole benchmark {report['wall_seconds'] / 60:.1f} min.", ""]
    return "\n".join(md + comparison_markdown(compared))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_pruning_args(parser, "structured.json")
    parser.add_argument("--recipes", nargs="+", default=list(STRUCTURED))
    parser.add_argument("--steps", type=int, default=None, help="override recovery.steps")
    parser.add_argument("--no-distill", action="store_true")
    parser.add_argument("--speed-windows", type=int, default=8)
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--no-importance-cost", action="store_true",
                        help="skip timing the importance pass against the evaluation forward")
    parser.add_argument("--compare-distill", action="store_true",
                        help="add the logit vs logit+intermediate Minitron rows to --out")
    parser.add_argument("--grad-accum", type=int, default=2,
                        help="--compare-distill: micro-batches per step (peak memory)")
    parser.add_argument("--dense-from-sparsity", action="store_true",
                        help="quote the dense perplexity from results/sparsity.json (same model "
                             "and protocol) instead of scoring it here")
    args = parser.parse_args()
    t_start = time.perf_counter()

    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.io import atomic
    from nnxprune.measure import count_params

    if args.dense_from_sparsity:
        from recovery import prepare_without_dense

        setup = prepare_without_dense(args)
    else:
        setup = prepare_pruning(args)
    dense_model = setup.loaded.model
    if args.compare_distill:
        import json

        report = json.loads(Path(args.out).read_text())  # every existing row is kept
        new = compare_distill(args, setup, report)
        report["rows"] = [r for r in report["rows"] if "distill" not in r] + new
        report["distill_comparison"] = {"wall_seconds": time.perf_counter() - t_start,
                                        "loadavg_end": list(os.getloadavg()),
                                        "date": time.strftime("%Y-%m-%d")}
        write_results(args.out, report, markdown(report))
        return

    def row(name, model, ppl):
        cfg = model.config
        return {"recipe": name, "params": count_params(model), "layers": cfg.num_layers,
                "hidden": cfg.hidden_size, "ppl": ppl, "ppl_after": None,
                "flops_per_token": forward_flops(cfg, args.eval_seqlen)}

    rows = [row("dense", dense_model, setup.dense_row["ppl"])
            | {"ppl_source": setup.dense_row.get("ppl_source") or "measured in this run"}]
    models = {"dense": dense_model}
    distill_info = {}
    for name in args.recipes:
        model, seconds, log = prune(setup, name)
        result = score_windows(model, setup.windows, setup.protocol, progress=False)
        r = row(name, model, result.ppl) | {"prune_seconds": seconds, "transforms": log}
        print(f"{name}: ppl {result.ppl:.3f}, {r['params']:,} params, pruned in {seconds:.0f} s", flush=True)
        if not args.no_distill:
            recipe_name = name if name.endswith("-distill") else f"{name}-distill"
            student, res, cfg = distill(setup, model, recipe_name, args.steps,
                                        Path(args.out).with_suffix("") / recipe_name)
            after = score_windows(student, setup.windows, setup.protocol, progress=False)
            r |= {"ppl_after": after.ppl, "distill_recipe": recipe_name,
                  "distill_tokens_per_s": res.tokens_per_second, "distill_seconds": res.seconds,
                  "distill_first_loss": res.losses[0], "distill_final_loss": res.losses[-1]}
            distill_info = {"steps": res.steps, "tokens": res.tokens, "batch_size": cfg.batch_size,
                            "seqlen": cfg.seqlen, "lr": cfg.lr}
            print(f"  {recipe_name}: ppl {after.ppl:.3f} after {res.steps} steps", flush=True)
        rows.append(r)
        models[name] = model
        atomic.write_json(Path(args.out).with_suffix(".partial.json"), {"rows": rows})
    speed = time_forwards(models, setup.windows[:args.speed_windows], setup.protocol,
                          args.speed_rounds)
    for r in rows:
        r["tokens_per_s"] = speed[r["recipe"]]
    imp = None
    if not args.no_importance_cost:
        imp = importance_cost(setup, args.batch_size)
        print(f"importance pass {imp['importance_seconds']:.1f} s vs forward "
              f"{imp['forward_seconds']:.1f} s", flush=True)
    report = pruning_report("structured", args, setup, rows=rows, importance_cost=imp,
                            distillation=distill_info or {"steps": 0, "tokens": 0, "batch_size": 0,
                                                          "seqlen": 0, "lr": 0.0},
                            speed={"tokens": speed["_tokens"], "rounds": args.speed_rounds,
                                   "seconds": speed["_raw"]},
                            wall_seconds=time.perf_counter() - t_start)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    write_results(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
