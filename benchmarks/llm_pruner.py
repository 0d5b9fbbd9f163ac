"""LLM-Pruner on SmolLM2-135M: every importance variant at one parameter budget, and LoRA.

Ma et al., arXiv 2305.11627 (code horseee/LLM-Pruner). One run, one machine, one calibration
draw (C4, LLM-Pruner's 10 x 64, seed 0). Each variant prunes a copy of the dense model with the
`llm_pruner` transform (ratio 0.34, heads = "q", layers 4 .. 28: the settings of
recipes/llm-pruner-*.toml, about 20% of the parameters) and is scored under two protocols:
WikiText-2 at `--eval-seqlen` (first `--eval-windows` windows) and LLM-Pruner's own seqlen 128
(first `--eval128-windows` windows). The gradient pass is timed against one evaluation forward
(logits and the mean cross-entropy) of the same calibration tokens, both jitted and compiled
first, medians of `--repeats`. With `--lora-steps N` > 0 (default 20), element1 is then
recovered with LoRA (rank 8, alpha 16, dropout 0.05 on the seven projections, lr 1e-4, AdamW
beta2 0.999, linear decay to 0, with `--lora-eval-every N` the best held-out evaluation kept: LLM-Pruner's
`post_training.py` settings; plain C4 text, or with `--lora-data FILE.jsonl` instruction records
in the Alpaca template, prompt masked) and scored again (`element1-lora`, `ppl_after`).
`--lora-inits` only prunes element1 and recovers it twice, from PEFT's LoRA initialization and
from the earlier he_uniform one (sqrt(6) = 2.45x larger `A`), everything else equal, and adds the
rows `element1-lora-peft` / `element1-lora-he_uniform` (with `lora_init` and the step budget) to
the existing results.

    python benchmarks/llm_pruner.py                              # ~10 min on 2 cores
    python benchmarks/llm_pruner.py --variants element1,random --eval-windows 4   # a quick look
    python benchmarks/llm_pruner.py --lora-inits --lora-steps 15     # the two inits

Writes benchmarks/results/llm_pruner.json and llm_pruner.md (`rows`: variant, params, ppl,
ppl_128, gradient-pass seconds; ppl_after for the LoRA row).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, median, write_results  # noqa: E402

SCORES = {"element1": "taylor", "element2": "taylor_element2", "vector": "taylor_vector",
          "mix": "taylor_mix", "l2": "l2", "random": "random"}


def time_passes(model, tokens, repeats: int) -> dict:
    """Median seconds of the gradient pass (first order; and with the per-sequence second-order
    scan) and of one evaluation forward of the same tokens, each compiled before timing."""
    from nnxprune.calibration.gradients import gradient_pass, mean_next_token_ce

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda g, s, t: mean_next_token_ce(nnx.merge(g, s)(t), t))
    toks = jnp.asarray(tokens)
    forward(graphdef, state, toks).block_until_ready()
    gradient_pass(model, tokens, second_order=True)  # compiles both
    fwd, grad, sq = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(graphdef, state, toks).block_until_ready()
        fwd.append(time.perf_counter() - t0)
        g = gradient_pass(model, tokens, second_order=True)
        grad.append(g.seconds)
        sq.append(g.seconds_sq)
    out = {"forward_seconds": median(fwd), "gradient_seconds": median(grad),
           "gradient_sq_seconds": median(sq), "forward_runs": fwd, "gradient_runs": grad,
           "gradient_sq_runs": sq}
    out["gradient_over_forward"] = out["gradient_seconds"] / out["forward_seconds"]
    return out


def lora_settings(args, init: str = "peft") -> dict:
    """The LoRA recovery of recipes/llm-pruner-element1-lora.toml at `--lora-steps` steps:
    LLM-Pruner's optimizer (AdamW beta2 0.999, linear decay to 0, dropout 0.05, the best
    held-out evaluation kept when `--lora-eval-every` > 0), warmup a tenth of the steps (the
    reference's 100 of ~1,560)."""
    data = {"dataset": args.lora_data, "prompt_template": "alpaca"} if args.lora_data else {"dataset": "c4"}
    every = args.lora_eval_every
    return {"kind": "lora", **data, "steps": args.lora_steps, "batch_size": 4,
            "grad_accum": args.lora_grad_accum, "seqlen": 256,
            "lr": 1e-4, "warmup_steps": max(args.lora_steps // 10, 1), "schedule": "linear",
            "min_lr_ratio": 0.0, "beta2": 0.999, "eval_every": every, "eval_batches": 1 if every else 0,
            "keep_best": every > 0, "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.05, "init": init}}


def lora_after(model, args, tokenizer, data_dir, init: str = "peft") -> dict:
    from nnxprune.recovery.config import RecoveryConfig
    from nnxprune.recovery.run import recover

    cfg = RecoveryConfig.from_dict(lora_settings(args, init))
    return recover(model, cfg, tokenizer=tokenizer, data_dir=data_dir, progress=False)


def lora_row(before: dict, after: dict, entry: dict, args, init: str, params: int) -> dict:
    return {"variant": f"element1-lora-{init}", "params": params, "ppl": before["ppl"],
            "ppl_128": before["ppl_128"], "ppl_after": after["ppl"], "ppl_128_after": after["ppl_128"],
            "lora_init": init, "lora_steps": args.lora_steps,
            "lora_budget": f"{args.lora_steps} steps x 4 x 256 tokens",
            "lora_settings": entry["settings"], "lora_first_loss": entry.get("first_loss"),
            "lora_final_loss": entry.get("final_loss"), "lora_best": entry.get("best"),
            "lora_evals": entry.get("evals"), "lora_seconds": entry.get("wall_seconds"),
            "lora_data": args.lora_data or "c4"}


def compare_inits(dense, calib, args, scores, tokenizer, data_dir, protocols) -> list[dict]:
    """element1 pruned once, then LoRA from PEFT's initialization and from the earlier
    he_uniform one, each on its own copy with everything else equal; each row is added to
    `--out` as soon as it is measured."""
    from nnxprune.measure import count_params
    from nnxprune.transforms import Context, from_dict

    pruned = nnx.clone(dense)
    from_dict({"kind": "llm_pruner", "score": "taylor", "ratio": args.ratio, "heads": args.heads})(
        pruned, Context(tokens=calib.tokens, progress=False))
    before = scores(pruned)
    print(f"element1 before LoRA {before}", flush=True)
    rows = []
    for init in ("he_uniform", "peft"):
        model = nnx.clone(pruned)
        entry = lora_after(model, args, tokenizer, data_dir, init)
        rows.append(lora_row(before, scores(model), entry, args, init, count_params(model)))
        print({k: v for k, v in rows[-1].items() if k not in ("lora_settings", "lora_evals")}, flush=True)
        append_rows(args, rows[-1:], protocols)
    return rows


def variant_rows(dense, calib, args, scores, tokenizer, data_dir) -> list[dict]:
    """One row per variant (a pruned copy of `dense`, scored), then the LoRA row if asked for."""
    from nnxprune.measure import count_params
    from nnxprune.transforms import Context, from_dict

    rows, element1 = [], None
    for variant in args.variants.split(","):
        spec = {"kind": "llm_pruner", "score": SCORES[variant], "ratio": args.ratio, "heads": args.heads}
        model = nnx.clone(dense)
        ctx = Context(tokens=calib.tokens, progress=False)
        t0 = time.perf_counter()
        from_dict(spec)(model, ctx)
        entry = ctx.report["transforms"][-1]
        row = {"variant": variant, "score": SCORES[variant], "params": count_params(model),
               "prune_seconds": time.perf_counter() - t0, **scores(model),
               "gradient_seconds": entry.get("timings", {}).get("gradient_pass"),
               "gradient_sq_seconds": entry.get("timings", {}).get("gradient_sq_pass"),
               "calibration_loss": entry.get("loss")}
        rows.append(row)
        if variant == "element1":
            element1 = model  # kept for LoRA; the other copies are dropped
        print(row, flush=True)
    if args.lora_steps > 0 and element1 is not None:
        model = element1
        before = next(r for r in rows if r["variant"] == "element1")
        entry = lora_after(model, args, tokenizer, data_dir)
        after = scores(model)
        rows.append({"variant": "element1-lora", "params": count_params(model), "ppl": before["ppl"],
                     "ppl_128": before["ppl_128"], "ppl_after": after["ppl"],
                     "ppl_128_after": after["ppl_128"], "lora_steps": args.lora_steps,
                     "lora_first_loss": entry.get("first_loss"),
                     "lora_final_loss": entry.get("final_loss"), "lora_data": args.lora_data or "c4",
                     "lora_init": "peft", "lora_budget": f"{args.lora_steps} steps x 4 x 256 tokens"})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", default=",".join(SCORES))
    p.add_argument("--ratio", type=float, default=0.34)
    p.add_argument("--heads", default="q")
    p.add_argument("--nsamples", type=int, default=10)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval128-windows", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lora-steps", type=int, default=20)
    p.add_argument("--lora-grad-accum", type=int, default=1,
                   help="micro-batches per LoRA step (4: one sequence per forward, less memory)")
    p.add_argument("--lora-eval-every", type=int, default=0,
                   help="held-out evaluations every N LoRA steps, keeping the best (0: off)")
    p.add_argument("--lora-data", default=None, help="a JSONL of instruction records (default: C4 text)")
    p.add_argument("--lora-inits", action="store_true",
                   help="only prune element1 and compare LoRA from PEFT's init and from he_uniform; "
                        "the two rows are added to --out, its other rows kept")
    p.add_argument("--out", default=str(RESULTS / "llm_pruner.json"))
    args = p.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in SCORES]
    if bad:
        p.error(f"unknown variant(s) {bad}; known: {', '.join(SCORES)}")

    import datetime

    from nnxprune import data as data_lib
    from nnxprune.data import calibration_samples
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io.load import load_model
    from nnxprune.measure import count_params

    loaded = load_model(args.model)
    data_dir = data_lib.resolve_data_dir(None)
    protocols = {"ppl": protocol_for("wikitext2", seqlen=args.eval_seqlen, max_windows=args.eval_windows),
                 "ppl_128": protocol_for("wikitext2", seqlen=128, max_windows=args.eval128_windows)}
    windows = {k: data_lib.windows(data_lib.token_stream(pr, loaded.tokenizer, data_dir), pr)
               for k, pr in protocols.items()}
    calib = calibration_samples(loaded.tokenizer, dataset="c4", nsamples=args.nsamples,
                                seqlen=args.seqlen, seed=args.seed, data_dir=data_dir)

    def scores(model) -> dict:
        return {k: score_windows(model, windows[k], pr, progress=False).ppl for k, pr in protocols.items()}

    dense = loaded.model
    if args.lora_inits:
        compare_inits(dense, calib, args, scores, loaded.tokenizer, data_dir, protocols)
        return 0
    timing = time_passes(dense, calib.tokens, args.repeats)
    print(f"gradient pass {timing['gradient_seconds']:.3f} s, forward {timing['forward_seconds']:.3f} s "
          f"({timing['gradient_over_forward']:.2f}x); second order {timing['gradient_sq_seconds']:.3f} s",
          flush=True)
    rows = [{"variant": "dense", "params": count_params(dense), **scores(dense)}]
    print(rows[0], flush=True)
    rows += variant_rows(dense, calib, args, scores, loaded.tokenizer, data_dir)

    report = {"benchmark": "llm_pruner", "model": args.model, "source": loaded.source,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "settings": {"ratio": args.ratio, "heads": args.heads,
                                                      "layers": "4 .. 28 (first 4, last 2 whole)"},
              "calibration": {"dataset": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen,
                              "seed": args.seed, "source": str(calib.source)},
              "protocols": {k: pr.to_dict() for k, pr in protocols.items()},
              "timing": timing, "rows": rows}
    write_results(args.out, report, markdown(report, protocols))
    return 0


def append_rows(args, rows: list[dict], protocols) -> int:
    """Adds `rows` to the report at `--out` (replacing rows of the same variant), keeps the rest,
    and records this run's machine and date beside them."""
    import datetime
    import json

    report = json.loads(Path(args.out).read_text())
    names = {r["variant"] for r in rows}
    report["rows"] = [r for r in report["rows"] if r["variant"] not in names] + rows
    report.setdefault("lora_init_runs", []).append({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "variants": sorted(names)})
    write_results(args.out, report, markdown(report, protocols))
    return 0


def markdown(report: dict, protocols) -> str:
    dense = report["rows"][0]["params"]
    md = ["| variant | params | removed | ppl | ppl (seqlen 128) | ppl after LoRA | gradient pass s |",
          "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        grad = r.get("gradient_seconds")
        if r.get("gradient_sq_seconds"):
            grad = grad + r["gradient_sq_seconds"]
        after = f"{r['ppl_after']:.2f} / {r['ppl_128_after']:.2f}" if "ppl_after" in r else ""
        if r.get("lora_budget"):
            after += f" ({r['lora_budget']}, init {r['lora_init']})"
        md.append(f"| {r['variant']} | {r['params']:,} | {1 - r['params'] / dense:.2%} | {r['ppl']:.2f} | "
                  f"{r['ppl_128']:.2f} | {after} | {'' if grad is None else f'{grad:.2f}'} |")
    t, c = report["timing"], report["calibration"]
    md += ["", f"{report['model']} ({report['source']}); {report['machine']['cpu']}, "
               f"{report['machine']['affinity']} cores. llm_pruner ratio {report['settings']['ratio']}, "
               f"heads = {report['settings']['heads']!r}, layers {report['settings']['layers']}; "
               f"calibration c4 {c['nsamples']} x {c['seqlen']}, seed {c['seed']}. "
               f"ppl: {protocols['ppl'].describe()}; seqlen 128: {protocols['ppl_128'].describe()}.",
           "", f"Gradient pass (one jitted value-and-grad of the mean CE over all {c['nsamples']} x "
               f"{c['seqlen']} tokens) {t['gradient_seconds']:.3f} s against one evaluation forward "
               f"(logits + CE) of the same tokens {t['forward_seconds']:.3f} s: "
               f"{t['gradient_over_forward']:.2f}x (medians of {len(t['forward_runs'])}, compiled "
               f"first). The second-order scan (one backward per sequence) "
               f"{t['gradient_sq_seconds']:.3f} s."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
