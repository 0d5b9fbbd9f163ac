"""Sheared LLaMA on SmolLM2-135M: the pruning stage (learned masks toward a target, then the fold)
and continued pretraining with dynamic batch loading, against the same steps with fixed weights.

    OPENBLAS_NUM_THREADS=1 NNXPRUNE_DATA_DIR=../shared/data python benchmarks/sheared.py

Stage 1, pruning (`prune_stage`): the target of `recipes/sheared-smollm2-90m.toml` (layers,
query heads, MLP neurons and hidden channels, each named) is learned with hard-concrete masks and
Lagrange multipliers on C4 validation windows (`nnxprune.transforms.sheared.prune_to_target`),
then folded to exactly the target shapes. Recorded: the expected parameter count at every step
(and a plot), the expected sizes against the target, the folded model's parameter count and
shapes, WikiText-2 perplexity before and after (reduced protocol: seqlen 1024, the first
`--eval-windows` windows), tokens/s of the stage beside the plain recovery trainer's
(`recovery.train`, kind pretrain, same model size, batch and seqlen, measured in the same run),
and the HF export loaded by plain `transformers` with its logits compared to ours.

Stage 2, continued pretraining (`pretrain_stage`): the folded model trains on three domains of
the C4 validation slice split by URL site category (`nnxprune.data.domains`: news, forums,
other), twice from the same start with the same steps, batch, seed and held-out windows: once
with dynamic batch loading (`recovery.dynamic`: the domain weights move every `--eval-every`
steps by the excess of each domain's held-out loss over its reference loss), once with the
weights fixed. Initial weights: uniform over the domains (the paper starts from RedPajama's
proportions; uniform keeps the small domains visible in a short run). Reference losses: the
dense (unpruned) model's own held-out loss per domain, measured here (the paper predicts them
from scaling laws). Recorded: WikiText-2 perplexity after each run, the mean excess loss over
the domains at every evaluation, the domain weights over time (a plot) and tokens/s.

Writes `benchmarks/results/sheared.json` (keys `target_params`, `final_params`,
`ppl_after_pruning`, `ppl_after_pretraining` (the dynamic run), `ppl_after_pretraining_fixed`,
`final_mean_excess`, ...), `sheared.md`, `sheared_params.png` and `sheared_domains.png`, and the
two runs' log folders under `benchmarks/results/sheared/`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine_info, write_results  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sheared-smollm2-90m.toml"
TOKENS = np.asarray([[1116, 446, 6356, 389, 253, 1761, 28, 2363, 1184, 30, 2744, 314, 260, 1072,
                      282, 253, 3391, 3500, 30, 378, 1026, 3003, 327, 260]], np.int64)


def recipe_step(overrides=()):
    """The `sheared` transform of the recipe (with `--set` style overrides)."""
    from nnxprune.recipes import load_recipe

    recipe = load_recipe(RECIPE, overrides)
    return recipe, next(s for s in recipe.pipeline.steps if s.kind == "sheared")


def prune_stage(model, tokenizer, step, *, data_dir, eval_windows, protocol,
                progress: bool = False):
    """Stage 1 on `model` (in place): learn, fold, score. Returns `(model, dict)`."""
    from nnxprune import data as data_lib
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.measure import count_params
    from nnxprune.transforms.sheared import prune_to_target

    cfg = step.training()
    windows = data_lib.load_windows(tokenizer, step.dataset, seqlen=cfg.seqlen,
                                    train_windows=cfg.steps * cfg.batch_size, heldout_windows=0,
                                    data_dir=data_dir)
    source_params = count_params(model)
    t0 = time.perf_counter()
    result, record = prune_to_target(model, step.target, cfg, windows.train, progress=progress)
    stage_seconds = time.perf_counter() - t0
    after = score_windows(model, eval_windows, protocol, progress=False)
    shape = model.config.layers[0]
    step_s = [h["seconds"] for h in result.history[1:]]  # the first step compiles
    out = {
        "source_params": source_params,
        "target_params": record["target_params"],
        "final_params": count_params(model),
        "expected_params_final": record["expected_params"],
        "expected_params_gap": record["expected_params"] / record["target_params"] - 1.0,
        "expected_sizes": record["expected_sizes"],
        "expected_size_gaps": record["expected_gap"],
        "target": record["target"], "head_mode": record["head_mode"],
        "final_shape": {"layers": model.config.num_layers, "hidden": model.config.hidden_size,
                        "heads": shape.num_heads, "kv_heads": shape.num_kv_heads,
                        "intermediate": shape.intermediate_size,
                        "uniform": model.config.is_uniform},
        "ppl_after_pruning": after.ppl,
        "prune_history": [{k: v for k, v in h.items()} for h in result.history],
        "prune_tokens": result.tokens, "prune_seconds": stage_seconds,
        "prune_compile_seconds": result.compile_seconds,
        "prune_tokens_per_second": result.tokens_per_second,
        "prune_median_step_seconds": float(np.median(step_s)) if step_s else None,
        "prune_median_tokens_per_second": cfg.batch_size * cfg.seqlen / float(np.median(step_s))
        if step_s else None,
        "prune_data": {"dataset": step.dataset, "source": windows.source,
                       "train_windows": int(len(windows.train))},
        "prune_settings": step.to_dict(),
    }
    return model, out


DOMAINS = ("news", "forums", "other")


def pretrain_config(args, reference: dict[str, float], dynamic: bool):
    """The continued-pretraining recipe section: C4 domains by site category, uniform weights."""
    from nnxprune.recovery import RecoveryConfig

    return RecoveryConfig.from_dict({
        "kind": "pretrain", "steps": args.pretrain_steps, "batch_size": args.pretrain_batch,
        "seqlen": args.pretrain_seqlen, "lr": args.pretrain_lr, "warmup_steps": 4,
        "eval_every": args.eval_every, "eval_batches": args.eval_batches, "seed": 0,
        "dynamic": dynamic,
        "domains": {n: {"source": "c4", "category": n, "weight": 1.0,
                        "reference_loss": reference[n]} for n in DOMAINS}})


def domain_data(dense, tokenizer, args, data_dir):
    """The domains' windows and the dense model's held-out loss on each (the reference)."""
    from nnxprune import data as data_lib
    from nnxprune.data.domains import load_domain_windows
    from nnxprune.recovery.continued import domain_losses

    probe = pretrain_config(args, dict.fromkeys(DOMAINS, 0.0), True)
    windows = load_domain_windows(probe.domains, tokenizer, seqlen=args.pretrain_seqlen,
                                  train_windows=args.pretrain_steps * args.pretrain_batch,
                                  heldout_windows=args.eval_batches * args.pretrain_batch,
                                  data_dir=data_dir)
    heldout = {n: data_lib.heldout_batches(w.heldout, args.pretrain_batch, args.eval_batches)
               for n, w in windows.items()}
    return windows, heldout, domain_losses(dense, heldout)


def pretrain_stage(model, tokenizer, args, *, windows, heldout, reference, data_dir,
                   eval_windows, protocol, log_root: Path) -> tuple[object, dict]:
    """Stage 2 on the folded `model`: a dynamic and a fixed-weight run from the same start.
    Returns the dynamic run's model and the stage's dict."""
    from flax import nnx

    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.recovery import continued_pretraining
    from nnxprune.recovery.continued import domain_losses

    start = domain_losses(model, heldout)
    runs, models = {}, {}
    for mode in ("dynamic", "fixed"):
        trained = nnx.clone(model)
        t0 = time.perf_counter()
        result = continued_pretraining(trained, pretrain_config(args, reference, mode == "dynamic"),
                                       tokenizer, data_dir, windows=windows,
                                       log_dir=log_root / mode)
        r = result.to_dict()
        r["wall_seconds"] = time.perf_counter() - t0
        r["ppl"] = score_windows(trained, eval_windows, protocol, progress=False).ppl
        print(f"{mode}: mean excess {r['domains']['final_mean_excess']:.4f}, ppl {r['ppl']:.3f}, "
              f"{r['tokens_per_second']:.0f} tokens/s, {r['wall_seconds']:.0f} s", flush=True)
        runs[mode], models[mode] = r, trained
    keep = ("losses", "domains", "tokens_per_second", "seconds", "compile_seconds", "wall_seconds",
            "ppl")
    out = {"ppl_after_pretraining": runs["dynamic"]["ppl"],
           "ppl_after_pretraining_fixed": runs["fixed"]["ppl"],
           "final_mean_excess": {m: r["domains"]["final_mean_excess"] for m, r in runs.items()},
           "pretrain_domains": {n: {"reference_loss": reference[n], "start_loss": start[n],
                                    **windows[n].describe()} for n in DOMAINS},
           "pretrain_runs": {m: {k: r[k] for k in keep} for m, r in runs.items()},
           "pretrain_settings": {k: getattr(args, k) for k in (
               "pretrain_steps", "pretrain_batch", "pretrain_seqlen", "pretrain_lr", "eval_every",
               "eval_batches")}}
    return models["dynamic"], out


def plot_domains(stage: dict, path: Path) -> None:
    """Domain weights (dynamic run) and the mean excess loss of both runs over the steps."""
    from matplotlib.figure import Figure

    from nnxprune.io import atomic

    dyn = stage["pretrain_runs"]["dynamic"]["domains"]["history"]
    fix = stage["pretrain_runs"]["fixed"]["domains"]["history"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    a, b = fig.subplots(1, 2)
    steps = [h["step"] for h in dyn]
    for n in DOMAINS:
        a.plot(steps, [h["weights"][n] for h in dyn], marker="o", label=n)
    a.set_xlabel("step")
    a.set_ylabel("domain weight")
    a.set_title("dynamic batch loading: weights")
    a.legend()
    b.plot(steps, [h["mean_excess"] for h in dyn], marker="o", label="dynamic")
    b.plot([h["step"] for h in fix], [h["mean_excess"] for h in fix], marker="s", label="fixed")
    b.set_xlabel("step")
    b.set_ylabel("mean excess loss over domains")
    b.set_title("held-out loss above the dense model's")
    b.legend()
    atomic.write_figure(path, fig)


def plain_trainer_speed(model, tokenizer, step, *, data_dir, steps: int) -> dict:
    """Tokens/s of `recovery.train` (kind pretrain) on `model` at the stage's batch and seqlen."""
    from flax import nnx

    from nnxprune import data as data_lib
    from nnxprune.recovery import RecoveryConfig, train

    cfg = step.training()
    rc = RecoveryConfig.from_dict({"kind": "pretrain", "steps": steps, "batch_size": cfg.batch_size,
                                   "grad_accum": cfg.grad_accum, "seqlen": cfg.seqlen, "lr": cfg.lr,
                                   "warmup_steps": 1, "eval_every": 0, "eval_batches": 0})
    windows = data_lib.load_windows(tokenizer, step.dataset, seqlen=cfg.seqlen,
                                    train_windows=steps * cfg.batch_size, heldout_windows=0,
                                    data_dir=data_dir)
    with tempfile.TemporaryDirectory() as logs:
        result = train(nnx.clone(model), rc, windows=windows, progress=False, log_dir=logs)
        rows = [json.loads(r) for r in (Path(logs) / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed"] for r in rows if r.get("split") == "train"]
    step_s = np.diff(elapsed)  # steps 2.. (the first compiles)
    return {"steps": steps, "tokens_per_second": result.tokens_per_second,
            "median_step_seconds": float(np.median(step_s)),
            "median_tokens_per_second": cfg.batch_size * cfg.seqlen / float(np.median(step_s)),
            "compile_seconds": result.compile_seconds}


def hf_parity(model, tokenizer) -> dict:
    """Exports `model` to an HF folder and compares plain transformers' logits with ours."""
    import torch

    from nnxprune.io.hf import export_hf, load_in_transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf(model, Path(tmp) / "hf", tokenizer=tokenizer)
        torch_model = load_in_transformers(folder)
        with torch.no_grad():
            theirs = torch_model(torch.as_tensor(TOKENS)).logits.numpy()
    ours = np.asarray(model(TOKENS.astype(np.int32)))
    return {"max_abs_logit_diff": float(np.max(np.abs(ours - theirs))),
            "logit_scale": float(np.max(np.abs(ours))), "tokens": TOKENS.shape[1]}


def plot_params(history, target: int, source: int, path: Path, final: int | None = None) -> None:
    from matplotlib.figure import Figure

    from nnxprune.io import atomic

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, [h["expected_params"] / 1e6 for h in history], label="expected (masks)")
    ax.axhline(target / 1e6, color="k", ls="--", lw=1, label="target")
    ax.axhline(source / 1e6, color="grey", ls=":", lw=1, label="source")
    if final is not None:
        ax.plot([steps[-1]], [final / 1e6], "o", color="C3", label="folded model")
    ax.set_xlabel("step")
    ax.set_ylabel("parameters (M)")
    ax.set_title("Sheared LLaMA pruning stage, SmolLM2-135M")
    ax.legend()
    atomic.write_figure(path, fig)


def markdown(report: dict) -> str:
    s = report["final_shape"]
    t = report["target"]
    lines = [
        "| | value |", "|---|---|",
        f"| source params | {report['source_params']:,} |",
        f"| target params | {report['target_params']:,} |",
        f"| expected params at the end | {report['expected_params_final']:,.0f} "
        f"({report['expected_params_gap']:+.2%}) |",
        f"| final (folded) params | {report['final_params']:,} |",
        f"| target shape | {t['layers']} layers, {t['heads']} heads / {t['kv_heads']} KV, MLP "
        f"{t['intermediate']}, hidden {t['hidden']} |",
        f"| folded shape | {s['layers']} layers, {s['heads']} heads / {s['kv_heads']} KV, MLP "
        f"{s['intermediate']}, hidden {s['hidden']} (uniform: {s['uniform']}) |",
        f"| WikiText-2 ppl dense | {report['ppl_dense']:.2f} |",
        f"| WikiText-2 ppl after pruning | {report['ppl_after_pruning']:.2f} |",
        f"| pruning stage tokens/s | {report['prune_tokens_per_second']:.1f} "
        f"({report['prune_tokens']:,} tokens, {report['prune_seconds']:.0f} s) |",
    ]
    lines.append(f"| pruning stage median step | {report['prune_median_step_seconds']:.2f} s "
                 f"({report['prune_median_tokens_per_second']:.1f} tokens/s) |")
    for i, plain in enumerate(report.get("plain_trainer") or []):
        when = "before" if i == 0 else "after"
        lines.append(f"| plain recovery trainer ({when} the stage; dense model, same batch and "
                     f"seqlen) median step | {plain['median_step_seconds']:.2f} s "
                     f"({plain['median_tokens_per_second']:.1f} tokens/s) |")
    if report.get("hf_parity"):
        lines.append(f"| HF export, transformers max abs logit diff | "
                     f"{report['hf_parity']['max_abs_logit_diff']:.2e} |")
    if "ppl_after_pretraining" in report:
        runs, st = report["pretrain_runs"], report["pretrain_settings"]
        ex = report["final_mean_excess"]
        lines.append(f"| WikiText-2 ppl after continued pretraining, dynamic / fixed weights | "
                     f"{report['ppl_after_pretraining']:.2f} / "
                     f"{report['ppl_after_pretraining_fixed']:.2f} |")
        lines.append(f"| mean excess loss over domains at the end, dynamic / fixed | "
                     f"{ex['dynamic']:.4f} / {ex['fixed']:.4f} |")
        lines.append(f"| continued pretraining tokens/s, dynamic / fixed | "
                     f"{runs['dynamic']['tokens_per_second']:.1f} / "
                     f"{runs['fixed']['tokens_per_second']:.1f} |")
        final_w = runs["dynamic"]["domains"]["history"][-1]["weights"]
        lines += ["", "| domain | reference (dense) loss | after pruning | dynamic: final | "
                      "fixed: final | dynamic: final weight |", "|---|---|---|---|---|---|"]
        for n, d in report["pretrain_domains"].items():
            lines.append(f"| {n} | {d['reference_loss']:.4f} | {d['start_loss']:.4f} | "
                         f"{runs['dynamic']['domains']['final_losses'][n]:.4f} | "
                         f"{runs['fixed']['domains']['final_losses'][n]:.4f} | {final_w[n]:.3f} |")
        lines += ["", f"Continued pretraining: {st['pretrain_steps']} steps x "
                      f"{st['pretrain_batch']} x {st['pretrain_seqlen']} tokens, AdamW lr "
                      f"{st['pretrain_lr']:g}, uniform initial weights, held-out "
                      f"{st['eval_batches']} x {st['pretrain_batch']} windows per domain every "
                      f"{st['eval_every']} steps; the reference loss is the dense model's."]
    gaps = ", ".join(f"{k} {v:+.2%}" for k, v in report["expected_size_gaps"].items())
    lines += ["", f"Expected sizes against the target at the last step: {gaps}.",
              f"Protocol: {report['protocol_text']}.",
              f"Machine: {report['machine']['cpu']}, {report['machine']['affinity']} cores, load "
              f"{report['machine']['loadavg_start'][0]:.1f} at the start; the whole benchmark "
              f"took {report['total_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--set", action="append", default=[], help="recipe override, prune.0.steps=50")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--trainer-steps", type=int, default=6)
    parser.add_argument("--pretrain-steps", type=int, default=40, help="0: no stage 2")
    parser.add_argument("--pretrain-batch", type=int, default=4)
    parser.add_argument("--pretrain-seqlen", type=int, default=128)
    parser.add_argument("--pretrain-lr", type=float, default=3e-4)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "sheared.json"))
    args = parser.parse_args()

    import datetime

    from flax import nnx

    from nnxprune import data as data_lib
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io.load import load_model

    t_start = time.perf_counter()
    recipe, step = recipe_step(args.set)
    loaded = load_model(args.model)
    step.check(loaded.model.config)
    data_dir = data_lib.resolve_data_dir(None)
    protocol = protocol_for("wikitext2", seqlen=1024, max_windows=args.eval_windows)
    windows = data_lib.windows(data_lib.token_stream(protocol, loaded.tokenizer, data_dir), protocol)
    dense = score_windows(loaded.model, windows, protocol, progress=False)
    print(f"dense ppl {dense.ppl:.3f}", flush=True)
    if args.pretrain_steps:
        domain_windows, heldout, reference = domain_data(loaded.model, loaded.tokenizer, args,
                                                         data_dir)
        print(f"dense reference losses {reference}", flush=True)
    dense_model = nnx.clone(loaded.model) if args.trainer_steps else None
    plain = [plain_trainer_speed(dense_model, loaded.tokenizer, step, data_dir=data_dir,
                                 steps=args.trainer_steps)] if args.trainer_steps else []
    model, stage = prune_stage(loaded.model, loaded.tokenizer, step, data_dir=data_dir,
                               eval_windows=windows, protocol=protocol, progress=True)
    if args.trainer_steps:  # again after the stage: the machine's load drifts during the run
        plain.append(plain_trainer_speed(dense_model, loaded.tokenizer, step, data_dir=data_dir,
                                         steps=args.trainer_steps))
    print(f"plain trainer {plain}", flush=True)
    print(f"pruned: {stage['final_params']:,} params (target {stage['target_params']:,}), ppl "
          f"{stage['ppl_after_pruning']:.3f}", flush=True)
    parity = hf_parity(model, loaded.tokenizer)
    out = Path(args.out)
    plot = out.with_name(out.stem + "_params.png")
    plot_params(stage["prune_history"], stage["target_params"], stage["source_params"], plot,
                final=stage["final_params"])
    if args.pretrain_steps:
        _, pretrain = pretrain_stage(model, loaded.tokenizer, args, windows=domain_windows,
                                     heldout=heldout, reference=reference, data_dir=data_dir,
                                     eval_windows=windows, protocol=protocol,
                                     log_root=out.with_suffix(""))
        stage.update(pretrain)
        plot_domains(stage, out.with_name(out.stem + "_domains.png"))
    report = {
        "benchmark": "sheared", "model": args.model, "source": loaded.source,
        "recipe": str(RECIPE.name), "overrides": args.set,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "threads": {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
        "protocol": protocol.to_dict(), "protocol_text": protocol.describe(),
        "ppl_dense": dense.ppl, **stage, "plain_trainer": plain, "hf_parity": parity,
        "plot": plot.name, "total_seconds": time.perf_counter() - t_start,
    }
    write_results(out, report, markdown(report))


if __name__ == "__main__":
    main()
