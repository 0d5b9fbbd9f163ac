"""`nnxprune prune RECIPE --stream`: prune a model larger than memory, one decoder layer at a time.

The weights stay in their files (`nnxprune.io.layers`); the calibration activations of every
sample live on the host; each decoder layer is onloaded in the run dtype, its statistics
collected, pruned by the method's own per-layer code (`Sparsify.prune_layer`, the code the
in-memory transform runs), its outputs computed for the next layer, and then written out as its own
safetensors shard and released (`nnxprune.calibration.streamed`). The output is a Hugging Face
folder in the input's dtype (a GGUF input gives float32, what it dequantizes to), masks folded
into the kernels, written inside `atomic_dir`: it appears whole or not at all.

What streams today: one layer-local sparsity step (magnitude, wanda or sparsegpt, unstructured
or N:M, with `layer_sparsity`). Everything else is refused before any work, with what is
supported. Evaluation does not stream yet: a recipe's [eval] is skipped with a note (evaluate the
output with `nnxprune eval OUT`); [recovery] and lm-eval tasks are refused.

Example:
    >>> run_streamed_recipe(load_recipe("recipes/wanda.toml"), model="smollm2-135m",
    ...                     out="out/wanda-streamed", report_path="out/wanda-streamed.json")
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from nnxprune import data as data_lib
from nnxprune.calibration.streamed import run_streamed
from nnxprune.errors import UserError
from nnxprune.io import atomic
from nnxprune.io.layers import HFLayerWriter, open_layers
from nnxprune.io.load import load_tokenizer, peek_config
from nnxprune.io.resumable import StreamState, adopter, run_key
from nnxprune.measure import memory_peaks, peak_rss_bytes
from nnxprune.recipes import Recipe
from nnxprune.transforms import Context
from nnxprune.transforms.sparsify import Sparsify, by_layer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def add_stream_arguments(p) -> None:
    """The `prune` command's options of this module: --stream, --resume, --dtype."""
    p.add_argument("--stream", action="store_true", help="one decoder layer in memory at a time; "
                   "--out is an HF folder written layer by layer (magnitude, wanda, sparsegpt)")
    p.add_argument("--resume", action="store_true",
                   help="with --stream: continue an unfinished (killed or interrupted) run of the "
                        "same recipe, model and --dtype at its first unfinished layer, and keep "
                        "this run's partial state if it is interrupted")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype of the loaded weights (statistics stay float32)")


def streamable_step(recipe: Recipe) -> Sparsify:
    """The recipe's one streamable step, or a one-line UserError saying what streams."""
    steps = recipe.pipeline.steps
    kinds = ", ".join(s.kind for s in steps) or "none"
    supported = "magnitude, wanda or sparsegpt (unstructured or N:M)"
    if len(steps) != 1 or not getattr(steps[0], "streamable", False):
        raise UserError(f"--stream runs one layer-local sparsity step: {supported}; this recipe "
                        f"has {len(steps)} step(s) ({kinds}). Drop --stream to run it in memory")
    if recipe.recovery is not None:
        raise UserError("--stream does not run [recovery] (training needs the whole model); "
                        "drop the section or --stream")
    if recipe.lm_eval is not None:
        raise UserError("--stream does not run lm-eval tasks yet; drop [eval.lm_eval] or --stream")
    return steps[0]


def check_streamed(recipe: Recipe, name: str | None, out, report_path, data_dir, dtype: str,
                   overwrite: bool = False):
    """Every check of a streamed run that needs no weights; returns (step, data folder)."""
    step = streamable_step(recipe)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not name:
        raise UserError("no model: pass --model or set [recipe] model")
    if out is None:
        raise UserError("--stream writes the pruned model layer by layer: pass --out")
    atomic.check_outputs(folders=[out], files=[report_path] if report_path else [],
                         overwrite=overwrite)
    data_dir = data_lib.resolve_data_dir(data_dir)
    if recipe.calibration is not None and step.needs_calibration:
        from nnxprune.preflight import check_calibration

        check_calibration(recipe.calibration.dataset, data_dir)
    config = peek_config(name)  # the weight-free checks, as the in-memory run's
    if config is not None:
        recipe.check(config)
        recipe.check_changes(config)
    return step, data_dir


def prune_streamed(step: Sparsify, source, tokens, writer: HFLayerWriter, ctx: Context, *,
                   param_dtype=jnp.float32, state: StreamState | None = None) -> dict[str, Any]:
    """Runs `step` layer by layer over `source` into `writer` (the globals first); records what
    it did in `ctx` as the in-memory transform would. Returns the driver's timings. With `state`
    (`io.resumable`) each finished layer is recorded there, and the layers an earlier run
    recorded are skipped: their shards, log and timings are taken as they are."""
    names = by_layer(step.selected(source.config))
    start = state.done if state is not None else 0
    if start:
        manifest = state.manifest
        writer.restore(manifest["writer"])
        log, earlier, x = manifest["log"], manifest["per_layer"], state.activations()
    else:
        writer.write_globals({k: source.tensor(k) for k in source.global_keys()})
        log, earlier, x = {"per_matrix": {}}, [], None

    def visit(i, layer, calib):
        if i in names:
            step.prune_layer(i, layer, calib, names[i], log)

    def after_layer(i, x, timings):
        if state is not None:
            state.save(i + 1, x, writer.state(), log, earlier + timings["per_layer"])

    timings = run_streamed(source, tokens, visit, step.layer_collectors(names) if tokens is not None
                           else (), write=writer.write_layer, param_dtype=param_dtype,
                           batch_size=getattr(step, "batch_size", 8), progress=ctx.progress,
                           desc=f"{step.kind} (streamed)", start=start, x=x,
                           after_layer=after_layer)
    timings["per_layer"] = earlier + timings["per_layer"]
    per_matrix = log.pop("per_matrix")
    values = np.asarray(list(per_matrix.values()) or [0.0])
    ctx.log(step.kind, matrices=len(per_matrix), mean_sparsity=float(values.mean()),
            per_matrix=per_matrix, pattern=step.pattern or "unstructured", timings=timings,
            calibration_tokens=int(tokens.size) if tokens is not None else 0, streamed=True,
            resumed_at=start, **log)
    return timings


@atomic.run_outputs()  # outputs checked at startup are checked again when written
def run_streamed_recipe(recipe: Recipe, *, model: str | None, out: str | None,
                        report_path: str | None = None, data_dir=None, dtype: str = "float32",
                        progress: bool = True, echo=print, overwrite: bool = False,
                        resume: bool = False) -> dict[str, Any]:
    """Runs `recipe` on `model` layer by layer (module docstring); returns the report. With
    `resume` an unfinished run of the same recipe, model, dtype and calibration draw is continued
    at its first unfinished layer, and an interrupted run keeps its partial state (`io.resumable`)."""
    name = model or recipe.model
    step, data_dir = check_streamed(recipe, name, out, report_path, data_dir, dtype, overwrite)
    t0 = time.perf_counter()
    source = open_layers(name)
    cfg = source.config
    tokenizer = load_tokenizer(source.path, source.kind)
    echo(f"model     {name} ({source.kind}, {source.dtype}), {cfg.num_layers} layers, streamed "
         f"one layer at a time in {dtype}")
    ctx = Context(tokenizer=tokenizer, calibration=recipe.calibration, data_dir=data_dir,
                  progress=progress)
    tokens = ctx.calibration_tokens() if step.needs_calibration else None
    if tokens is not None:
        echo(f"calib     {tokens.shape[0]} x {tokens.shape[1]} tokens from "
             f"{recipe.calibration.dataset} (seed {recipe.calibration.seed})")
    if recipe.eval is not None:
        echo("eval      skipped: evaluation does not stream yet; run `nnxprune eval OUT`")
    t1 = time.perf_counter()
    key = run_key(recipe, source, dtype, tokens)
    with atomic.atomic_dir(out, overwrite=overwrite, adopt=adopter(key, echo) if resume else None,
                           keep=resume) as tmp:
        state = StreamState(tmp, key)
        if state.done:
            echo(f"resume    {state.done} of {cfg.num_layers} layers done by an earlier run; "
                 f"starting at layer {state.done}")
        writer = HFLayerWriter(tmp, cfg, dtype=source.dtype)
        timings = prune_streamed(step, source, tokens, writer, ctx, param_dtype=DTYPES[dtype],
                                 state=state)
        state.clear()
        writer.finish(tokenizer)
    seconds = time.perf_counter() - t1
    entry = ctx.report["transforms"][-1]
    report = {
        "recipe": {"name": recipe.name, "path": recipe.path, "settings": recipe.to_dict()},
        "model": name, "source": str(source.path), "streamed": True, "dtype": dtype,
        "output_dtype": source.dtype, "output": str(out),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": step.kind, "pattern": step.pattern or "unstructured",
        "target_sparsity": step.target_sparsity(), "sparsity": entry["mean_sparsity"],
        "transforms": ctx.report["transforms"],
        "seconds": {"prune": seconds, "total": time.perf_counter() - t0,
                    "per_layer": timings["per_layer"]},
        "resumed_at_layer": entry["resumed_at"], "peak_rss_bytes": peak_rss_bytes(),
        **memory_peaks(),
    }
    ran = cfg.num_layers - entry["resumed_at"]
    echo(f"pruned    {ran} layers in {seconds:.1f} s ({seconds / max(ran, 1):.2f} s per layer), "
         f"mean sparsity {entry['mean_sparsity']:.2%}; peak RSS {report['peak_rss_gb']:.2f} GB")
    echo(f"wrote     {out}")
    if report_path is not None:
        atomic.write_json(report_path, report)
        echo(f"wrote     {report_path}")
    return report
