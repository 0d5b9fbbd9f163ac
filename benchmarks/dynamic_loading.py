"""Dynamic batch loading (Sheared LLaMA, Xia et al., arXiv 2310.06694) against fixed domain weights,
on SmolLM2-135M pruned in depth, continued-pretrained over C4 domains.

The model: SmolLM2-135M with the 8 layers ShortGPT removes in benchmarks/results/structured.json
(3, 12, 13, 14, 15, 17, 25, 26; block influence on C4 32 x 1024), so that every domain starts
well above the dense model's loss. Domains: the C4 validation slice split by URL site category
(`nnxprune.data.domains`: news, forums, other). Reference losses: the dense (unpruned) model's
held-out cross-entropy on each domain, measured here (the paper predicts them from scaling laws).
Initial weights, for both runs: the domains' shares of the slice's documents (as the paper starts
from RedPajama's proportions). The two runs are the same pruned model, steps, batch, seed,
learning-rate schedule and held-out windows; one updates the weights every `--eval-every` steps
(`recovery.dynamic`), the other keeps them. Compared: the mean over domains of (held-out loss -
reference loss) at the end. A short plain recovery run (`kind = "pretrain"` on C4, the same
shapes) gives the trainer's tokens/s beside the domain runs' (step time only; evaluations and
batch drawing excluded in all three).

    python benchmarks/dynamic_loading.py                  # ~10 min on 2 loaded cores
    python benchmarks/dynamic_loading.py --steps 8 --eval-every 4    # a quick look

Writes benchmarks/results/dynamic_loading.json and .md (and the two runs' log folders under
benchmarks/results/dynamic_loading/, with domain_weights.png).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, write_results  # noqa: E402

SHORTGPT_DROPPED = [3, 12, 13, 14, 15, 17, 25, 26]  # benchmarks/results/structured.json, shortgpt


def domain_config(args, shares: dict[str, float], reference: dict[str, float], dynamic: bool):
    from nnxprune.recovery import RecoveryConfig

    return RecoveryConfig.from_dict({
        "kind": "pretrain", "steps": args.steps, "batch_size": args.batch_size,
        "seqlen": args.seqlen, "lr": args.lr, "warmup_steps": 4, "eval_every": args.eval_every,
        "eval_batches": args.eval_batches, "seed": 0, "dynamic": dynamic,
        "domains": {n: {"source": "c4", "category": n, "weight": shares[n],
                        "reference_loss": reference[n]} for n in args.domains.split(",")}})


def shares_of(names: list[str], data_dir) -> dict[str, float]:
    """Each category's share of the C4 slice's documents, over the chosen categories."""
    from nnxprune.data import domains

    path = Path(data_dir) / "c4_validation_2k.parquet"
    urls = domains._parquet_columns(path, ["url"])["url"]
    counts = {n: sum(domains.site_category(u) == n for u in urls) for n in names}
    total = sum(counts.values())
    return {n: c / total for n, c in counts.items()}


def run_domains(pruned, cfg, tokenizer, windows, data_dir, log_dir) -> dict:
    from nnxprune.recovery import continued_pretraining

    t0 = time.perf_counter()
    result = continued_pretraining(nnx.clone(pruned), cfg, tokenizer, data_dir, windows=windows,
                                   log_dir=log_dir)
    d = result.to_dict()
    d["wall_seconds"] = time.perf_counter() - t0
    print(f"{'dynamic' if cfg.dynamic else 'fixed'}: mean excess "
          f"{d['domains']['final_mean_excess']:.4f}, {d['tokens_per_second']:.0f} tokens/s, "
          f"{d['wall_seconds']:.0f} s", flush=True)
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--domains", default="news,forums,other")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--plain-steps", type=int, default=6)
    p.add_argument("--out", default=str(RESULTS / "dynamic_loading.json"))
    args = p.parse_args(argv)

    from nnxprune import data as data_lib
    from nnxprune.data.domains import load_domain_windows
    from nnxprune.graph.surgery import drop_layers
    from nnxprune.io.load import load_model
    from nnxprune.measure import count_params
    from nnxprune.recovery import RecoveryConfig, train
    from nnxprune.recovery.continued import domain_losses

    t_start = time.perf_counter()
    data_dir = data_lib.resolve_data_dir(None)
    if data_dir is None:
        p.error("set NNXPRUNE_DATA_DIR to the folder with c4_validation_2k.parquet")
    names = args.domains.split(",")
    loaded = load_model(args.model)
    dense, tok = loaded.model, loaded.tokenizer
    shares = shares_of(names, data_dir)
    probe = domain_config(args, shares, dict.fromkeys(names, 0.0), True)
    windows = load_domain_windows(probe.domains, tok, seqlen=args.seqlen,
                                  train_windows=args.steps * args.batch_size,
                                  heldout_windows=args.eval_batches * args.batch_size,
                                  data_dir=data_dir)
    heldout = {n: data_lib.heldout_batches(w.heldout, args.batch_size, args.eval_batches)
               for n, w in windows.items()}
    reference = domain_losses(dense, heldout)
    print("dense reference losses", reference, flush=True)
    pruned = nnx.clone(dense)
    drop_layers(pruned, SHORTGPT_DROPPED)
    del dense
    start = domain_losses(pruned, heldout)
    print("pruned start losses", start, flush=True)

    logs = Path(args.out).with_suffix("")
    runs = {mode: run_domains(pruned, domain_config(args, shares, reference, mode == "dynamic"),
                              tok, windows, data_dir, logs / mode) for mode in ("dynamic", "fixed")}
    plain_cfg = RecoveryConfig.from_dict({
        "kind": "pretrain", "dataset": "c4", "steps": args.plain_steps,
        "batch_size": args.batch_size, "seqlen": args.seqlen, "lr": args.lr, "warmup_steps": 2,
        "eval_every": 0, "eval_batches": 0})
    plain = train(nnx.clone(pruned), plain_cfg, tokenizer=tok, data_dir=data_dir,
                  progress=False).to_dict()
    print(f"plain: {plain['tokens_per_second']:.0f} tokens/s", flush=True)

    report = {
        "benchmark": "dynamic_loading", "model": args.model, "source": loaded.source,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "pruning": {"dropped_layers": SHORTGPT_DROPPED,
                                               "params": count_params(pruned)},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "domains": {n: {"share": shares[n], "reference_loss": reference[n],
                        "start_loss": start[n], **windows[n].describe()} for n in names},
        "runs": {mode: {k: r[k] for k in ("losses", "domains", "tokens_per_second", "seconds",
                                          "compile_seconds", "wall_seconds", "evals")}
                 for mode, r in runs.items()},
        "plain": {k: plain[k] for k in ("tokens_per_second", "seconds", "compile_seconds",
                                        "steps", "first_loss", "final_loss", "data")},
        "final_mean_excess": {m: r["domains"]["final_mean_excess"] for m, r in runs.items()},
        "wall_seconds": time.perf_counter() - t_start}
    write_results(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    names = list(report["domains"])
    runs, s = report["runs"], report["settings"]
    md = ["| domain | share (initial weight) | dense (reference) | pruned start | "
          "dynamic: final | fixed: final | dynamic: final weight | examples drawn (dynamic / "
          "fixed) |", "|---|---|---|---|---|---|---|---|"]
    dyn, fix = runs["dynamic"]["domains"], runs["fixed"]["domains"]
    for n in names:
        dom = report["domains"][n]
        md.append(f"| {n} | {dom['share']:.3f} | {dom['reference_loss']:.4f} | "
                  f"{dom['start_loss']:.4f} | {dyn['final_losses'][n]:.4f} | "
                  f"{fix['final_losses'][n]:.4f} | {dyn['history'][-1]['weights'][n]:.3f} | "
                  f"{dyn['draws'][n]} / {fix['draws'][n]} |")
    ex = report["final_mean_excess"]
    curve = ", ".join(f"{h['step']}: {h['mean_excess']:.4f} / {g['mean_excess']:.4f}"
                      for h, g in zip(dyn["history"], fix["history"]))
    md += ["", f"Mean excess loss over the domains after {s['steps']} steps: dynamic "
               f"{ex['dynamic']:.4f}, fixed {ex['fixed']:.4f} (difference "
               f"{ex['fixed'] - ex['dynamic']:+.4f} in favour of dynamic when positive). By step "
               f"(dynamic / fixed): {curve}. Both runs draw each batch's domains from the same "
               f"seeded uniforms, so they differ only where the weights moved a draw across a "
               f"domain boundary.", "",
           "| run | training tokens/s | compile s | wall s (with evaluations) |", "|---|---|---|---|"]
    for mode in ("dynamic", "fixed"):
        r = runs[mode]
        md.append(f"| {mode} domains | {r['tokens_per_second']:.0f} | {r['compile_seconds']:.1f} | "
                  f"{r['wall_seconds']:.0f} |")
    pl = report["plain"]
    md.append(f"| plain recovery trainer (C4, {pl['steps']} steps) | {pl['tokens_per_second']:.0f} | "
              f"{pl['compile_seconds']:.1f} | - |")
    m = report["machine"]
    md += ["", f"{report['model']} minus layers {report['pruning']['dropped_layers']} "
               f"({report['pruning']['params'] / 1e6:.1f}M parameters); C4 validation slice split "
               f"by URL site category; {s['steps']} steps x {s['batch_size']} x {s['seqlen']} "
               f"tokens, AdamW lr {s['lr']:g}, held-out {s['eval_batches']} x {s['batch_size']} "
               f"windows per domain every {s['eval_every']} steps; reference = the dense model's "
               f"loss. Tokens/s: step time only, steps after the first (compile), one run each, "
               f"sequential on a shared machine. {m['cpu']}, {m['affinity']} cores, load "
               f"{m['loadavg_start'][0]:.1f} at start; whole benchmark "
               f"{report['wall_seconds'] / 60:.1f} min."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
