"""Recovery benchmark: SmolLM2-135M pruned with Wanda 2:4, then a short logit distillation from the
dense teacher on the C4 slice; WikiText-2 perplexity before and after.

    OPENBLAS_NUM_THREADS=1 NNXPRUNE_DATA_DIR=../shared/data python benchmarks/recovery.py

Pruning: Wanda 2:4 (transform `wanda`, pattern 2:4) on the shared calibration draw (c4, 32 x 1024,
seed 0). Training: the `[recovery]` section of `recipes/wanda-2of4-distill.toml` (forward KL at
T=1 from the unpruned model, AdamW, warmup + cosine, clipping, masks held), options override it.
Training text is C4 validation (packed, EOS-joined windows); perplexity is measured on WikiText-2
test (seqlen 1024, first 32 windows), so the two never overlap. Writes
`benchmarks/results/recovery.json`, a Markdown table beside it, and the training log
(`recovery.train/metrics.jsonl`, `loss.png`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, add_pruning_args, machine_info, prepare_pruning, write_results  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "wanda-2of4-distill.toml"


def prepare_without_dense(args):
    """`common.prepare_pruning` minus the dense evaluation; the dense perplexity under the same
    protocol is taken from `results/sparsity.json` when it is there (labelled as such)."""
    import json
    from types import SimpleNamespace

    from nnxprune import data as data_lib
    from nnxprune.data import calibration_samples
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io.load import load_model
    from nnxprune.measure import measured_sparsity

    loaded = load_model(args.model)
    data_dir = data_lib.resolve_data_dir(None)
    protocol = protocol_for("wikitext2", seqlen=args.eval_seqlen, max_windows=args.eval_windows)
    windows = data_lib.windows(data_lib.token_stream(protocol, loaded.tokenizer, data_dir), protocol)
    t0 = time.perf_counter()
    calib = calibration_samples(loaded.tokenizer, dataset="c4", nsamples=args.nsamples,
                                seqlen=args.seqlen, seed=args.seed, data_dir=data_dir)
    draw_seconds = time.perf_counter() - t0
    dense_ppl, dense_source = None, None
    ref = RESULTS / "sparsity.json"
    if ref.is_file():
        prior = json.loads(ref.read_text())
        if prior.get("protocol") == protocol.to_dict() and prior.get("model") == args.model:
            dense_ppl = next((r["ppl"] for r in prior["rows"] if r["method"] == "dense"), None)
            dense_source = "benchmarks/results/sparsity.json (same model and protocol)"
    dense_row = {"method": "dense", "pattern": "-", "ppl": dense_ppl, "ppl_source": dense_source,
                 "sparsity": measured_sparsity(loaded.model)["overall"]}
    return SimpleNamespace(loaded=loaded, protocol=protocol, windows=windows, calib=calib,
                           draw_seconds=draw_seconds, dense_row=dense_row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_pruning_args(parser, "recovery.json")
    parser.add_argument("--set", action="append", default=[], metavar="recovery.KEY=VALUE",
                        help="override the recipe's [recovery] settings, e.g. recovery.steps=20")
    parser.add_argument("--dense", action="store_true",
                        help="also score the dense model here (else quoted from sparsity.json)")
    args = parser.parse_args()
    t_start = time.perf_counter()

    from flax import nnx

    from nnxprune import data as data_lib
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.recipes import load_recipe
    from nnxprune.recovery import train
    from nnxprune.measure import measured_sparsity
    from nnxprune.transforms import Context, from_dict

    recipe = load_recipe(RECIPE, args.set)
    cfg = recipe.recovery
    if args.dense:
        setup = prepare_pruning(args)  # model, eval windows, calibration draw, dense perplexity
    else:  # the same, without scoring the dense model (saves a pass on this CPU)
        setup = prepare_without_dense(args)
    teacher = setup.loaded.model
    cfg.check(teacher.config)
    t0 = time.perf_counter()
    student = nnx.clone(teacher)
    spec = {"kind": "wanda", "pattern": "2:4"}
    from_dict(spec)(student, Context(tokens=setup.calib.tokens, progress=False))
    prune_seconds = time.perf_counter() - t0
    before = score_windows(student, setup.windows, setup.protocol, progress=False)
    sparsity_before = measured_sparsity(student)["overall"]
    print(f"wanda 2:4 ppl {before.ppl:.3f} (pruned in {prune_seconds:.0f} s)", flush=True)

    log_dir = Path(args.out).with_suffix(".train")
    result = train(student, cfg, tokenizer=setup.loaded.tokenizer, teacher=teacher,
                   data_dir=data_lib.resolve_data_dir(None), log_dir=log_dir, progress=False,
                   echo=print)
    print(f"trained {result.steps} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
          f"{result.tokens_per_second:.0f} tokens/s", flush=True)
    after = score_windows(student, setup.windows, setup.protocol, progress=False)
    sparsity_after = measured_sparsity(student)["overall"]
    print(f"after distillation ppl {after.ppl:.3f}", flush=True)
    wall = time.perf_counter() - t_start

    rec = result.to_dict()
    report = {
        "benchmark": "recovery", "model": args.model, "source": setup.loaded.source,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine_info(), "loadavg_end": list(os.getloadavg())},
        "threads": {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
        "pruning": {**spec, "calibration": {"dataset": "c4", "nsamples": args.nsamples,
                                            "seqlen": args.seqlen, "seed": args.seed,
                                            "source": str(setup.calib.source)},
                    "seconds": prune_seconds},
        "protocol": setup.protocol.to_dict(), "protocol_text": setup.protocol.describe(),
        "ppl_dense": setup.dense_row["ppl"], "ppl_dense_source": setup.dense_row.get("ppl_source")
        or "measured in this run",
        "ppl_before": before.ppl, "ppl_after": after.ppl,
        "sparsity_before": sparsity_before, "sparsity_after": sparsity_after,
        "steps": result.steps, "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "train_seconds": result.seconds, "compile_seconds": result.compile_seconds,
        "first_loss": rec["first_loss"], "final_loss": rec["final_loss"],
        "heldout": result.evals, "recovery": cfg.to_dict(), "recipe": str(RECIPE.name),
        "data": result.data, "mesh": result.mesh,
        "tokens_per_second_note": "training tokens (student sequences) per second of step wall "
                                  "time, first (compiling) step excluded; each step runs the "
                                  "teacher forward and the student forward + backward",
        "wall_seconds": wall,
    }
    held = result.evals
    dense = setup.dense_row
    dense_text = "-" if dense["ppl"] is None else f"{dense['ppl']:.2f}" + (
        " (from sparsity.json)" if dense.get("ppl_source") else "")
    md = [
        "| model | WikiText-2 ppl | sparsity |", "|---|---|---|",
        f"| dense SmolLM2-135M (teacher) | {dense_text} | {setup.dense_row['sparsity']:.2%} |",
        f"| Wanda 2:4 | {before.ppl:.2f} | {sparsity_before:.2%} |",
        f"| Wanda 2:4 + distillation ({result.steps} steps, {result.tokens:,} tokens) | "
        f"{after.ppl:.2f} | {sparsity_after:.2%} |", "",
        f"Distillation: forward KL (T={cfg.distill.temperature:g}) from the dense model on C4 "
        f"validation windows of {cfg.seqlen} tokens, batch {cfg.batch_size}, AdamW lr "
        f"{cfg.lr:g} (warmup {cfg.warmup_steps}, cosine to {cfg.min_lr_ratio:g}x), clip "
        f"{cfg.clip_norm:g}, {cfg.compute_dtype}; training KL {rec['first_loss']:.3f} -> "
        f"{rec['final_loss']:.3f}"
        + (f", held-out KL {held[0]['loss']:.3f} -> {held[-1]['loss']:.3f}" if len(held) > 1 else "")
        + f". {result.tokens_per_second:.0f} training tokens/s on this 2-core CPU "
        f"(compile {result.compile_seconds:.0f} s); whole benchmark {wall / 60:.1f} min.",
        f"Pruning: Wanda 2:4, calibration c4 {args.nsamples} x {args.seqlen} (seed {args.seed}). "
        f"Protocol: {setup.protocol.describe()}.", ""]
    write_results(args.out, report, "\n".join(md))


if __name__ == "__main__":
    main()
