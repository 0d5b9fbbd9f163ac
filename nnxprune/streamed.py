"""`nnxprune prune RECIPE --stream`: prune a model larger than memory, one decoder layer at a time.

The weights stay in their files (`nnxprune.io.layers`: an HF folder, a GGUF file, or an nnxprune
checkpoint restored by Orbax one layer at a time, its masks kept on the layer so a method ANDs into
them as in memory, `nnxprune.io.orbax_layers`); the calibration activations of every
sample live on the host; each decoder layer is onloaded in the run dtype, its statistics
collected, pruned by the method's own per-layer code (the code the in-memory transform runs),
its outputs computed for the next layer, and then written out as its own safetensors shard and
released (`nnxprune.calibration.streamed`). Methods that measure before they cut run analysis
passes over the dense layers first (`nnxprune.streamed_passes`, `nnxprune.streamed_width`). The
output is a Hugging Face folder in the input's dtype (a GGUF input gives float32, what it
dequantizes to), masks folded into the kernels, biases (FLAP's, from a checkpoint) under HF's
`attention_bias` / `mlp_bias`, written inside `atomic_dir`: it appears whole or
not at all.

What streams (`STREAMS`; everything else is refused before any work, with this list):
- one sparsity step: magnitude, wanda, sparsegpt (unstructured or N:M, with `layer_sparsity`),
  sparsellm, owl (its outlier pass streamed too);
- depth by block influence (ShortGPT), alone (the kept layers are copied as stored, renumbered)
  or followed by one sparsity step;
- width (Minitron: heads, KV groups, MLP neurons, and hidden channels with the `activation`
  score), hard edits.
Evaluation does not stream yet: a recipe's [eval] is skipped with a note (evaluate the output
with `nnxprune eval OUT`); [recovery] and lm-eval tasks are refused.

Example:
    >>> run_streamed_recipe(load_recipe("recipes/wanda.toml"), model="smollm2-135m",
    ...                     out="out/wanda-streamed", report_path="out/wanda-streamed.json")
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import jax.numpy as jnp

from nnxprune import data as data_lib
from nnxprune.errors import UserError
from nnxprune.io import atomic
from nnxprune.io.layers import HFLayerWriter, open_layers
from nnxprune.io.load import load_tokenizer, peek_config
from nnxprune.io.resumable import StreamState, adopter, run_key
from nnxprune.measure import memory_peaks, peak_rss_bytes
from nnxprune.recipes import Recipe
from nnxprune.streamed_passes import copy_layers, depth_streamed, owl_streamed, prune_streamed
from nnxprune.streamed_width import why_not_streamed, width_streamed
from nnxprune.transforms import Context

__all__ = ["prune_streamed", "run_plan", "run_streamed_recipe", "streamable_steps"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SPARSITY = ("magnitude", "wanda", "sparsegpt", "sparsellm", "owl")
STREAMS = ("one sparsity step (magnitude, wanda, sparsegpt, sparsellm, owl), depth by block "
           "influence (ShortGPT) alone or before one sparsity step, or width (Minitron, hard)")


def add_stream_arguments(p) -> None:
    """The `prune` command's options of this module: --stream, --resume, --dtype."""
    p.add_argument("--stream", action="store_true", help="one decoder layer in memory at a time; "
                   f"--out is an HF folder written layer by layer ({STREAMS})")
    p.add_argument("--resume", action="store_true",
                   help="with --stream: continue an unfinished (killed or interrupted) run of the "
                        "same recipe, model and --dtype at its first unfinished layer, and keep "
                        "this run's partial state if it is interrupted")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype of the loaded weights (statistics stay float32)")


def _why_not(step, position: int, count: int) -> str | None:
    """Why `step` (at `position` of `count` steps) cannot stream, None when it can."""
    if step.kind in SPARSITY:
        return None if position == count - 1 else "a sparsity step streams only as the last step"
    if step.kind == "depth" and position == 0 and count <= 2:
        return None if step.method == "block_influence" else (
            f"depth method {step.method!r} scores whole models per candidate; "
            "block_influence streams")
    if step.kind == "width" and count == 1:
        return why_not_streamed(step)
    return f"{step.kind} does not stream" + (" in this place" if step.kind in ("depth", "width")
                                             else "")


def streamable_steps(recipe: Recipe) -> tuple:
    """The recipe's steps when they stream (module docstring), or a one-line UserError saying
    what streams."""
    steps = recipe.pipeline.steps
    kinds = ", ".join(s.kind for s in steps) or "none"
    reasons = [r for k, s in enumerate(steps) for r in [_why_not(s, k, len(steps))] if r]
    if not steps or reasons:
        why = f" ({reasons[0]})" if reasons else ""
        raise UserError(f"--stream runs {STREAMS}; this recipe has {len(steps)} step(s) "
                        f"({kinds}){why}. Drop --stream to run it in memory")
    if recipe.recovery is not None:
        raise UserError("--stream does not run [recovery] (training needs the whole model); "
                        "drop the section or --stream")
    if recipe.lm_eval is not None:
        raise UserError("--stream does not run lm-eval tasks yet; drop [eval.lm_eval] or --stream")
    return steps


def check_streamed(recipe: Recipe, name: str | None, out, report_path, data_dir, dtype: str,
                   overwrite: bool = False):
    """Every check of a streamed run that needs no weights; returns (steps, data folder)."""
    steps = streamable_steps(recipe)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not name:
        raise UserError("no model: pass --model or set [recipe] model")
    if out is None:
        raise UserError("--stream writes the pruned model layer by layer: pass --out")
    atomic.check_outputs(folders=[out], files=[report_path] if report_path else [],
                         overwrite=overwrite)
    data_dir = data_lib.resolve_data_dir(data_dir)
    if recipe.calibration is not None and recipe.pipeline.needs_calibration:
        from nnxprune.preflight import check_calibration

        check_calibration(recipe.calibration.dataset, data_dir)
    config = peek_config(name)  # the weight-free checks, as the in-memory run's
    if config is not None:
        recipe.check(config)
        recipe.check_changes(config)
    return steps, data_dir


def pass_names(steps) -> list[str]:
    """The passes over the layers a streamed run of `steps` makes, in order."""
    names = ["block influence"] if steps[0].kind == "depth" else []
    last = steps[-1]
    if last.kind == "owl":
        names.append("owl outliers")
    elif last.kind == "width" and last.hidden is not None:
        names.append("width statistics")
    return names + ["copy kept layers" if last.kind == "depth" else last.kind]


def run_plan(steps, source, tokens, folder, ctx: Context, *, param_dtype=jnp.float32,
             state: StreamState | None = None) -> tuple[HFLayerWriter, dict[str, Any]]:
    """Runs the streamable `steps` over `source`, writing the HF folder's shards into `folder`;
    returns the writer (to `finish`) and the last pass's timings."""
    index, step = 0, steps[0]
    kw = dict(param_dtype=param_dtype, state=state)
    if step.kind == "depth":
        source = depth_streamed(step, source, tokens, ctx, index=0, **kw)
        index = 1
        if len(steps) == 1:
            writer = HFLayerWriter(folder, source.config, dtype=source.dtype, biases=source.biases)
            return writer, copy_layers(source, writer, ctx, state=state, index=1)
        step = steps[1]
    out_config = step.check(source.config) if step.kind == "width" else source.config
    writer = HFLayerWriter(folder, out_config, dtype=source.dtype, biases=source.biases)
    run = {"width": width_streamed, "owl": owl_streamed}.get(step.kind, prune_streamed)
    return writer, run(step, source, tokens, writer, ctx, index=index, **kw)


@atomic.run_outputs()  # outputs checked at startup are checked again when written
def run_streamed_recipe(recipe: Recipe, *, model: str | None, out: str | None,
                        report_path: str | None = None, data_dir=None, dtype: str = "float32",
                        progress: bool = True, echo=print, overwrite: bool = False,
                        resume: bool = False) -> dict[str, Any]:
    """Runs `recipe` on `model` layer by layer (module docstring); returns the report. With
    `resume` an unfinished run of the same recipe, model, dtype and calibration draw is continued
    at its first unfinished layer, and an interrupted run keeps its partial state (`io.resumable`)."""
    name = model or recipe.model
    steps, data_dir = check_streamed(recipe, name, out, report_path, data_dir, dtype, overwrite)
    t0 = time.perf_counter()
    source = open_layers(name)
    cfg = source.config
    tokenizer = load_tokenizer(source.path, source.kind)
    passes = pass_names(steps)
    echo(f"model     {name} ({source.kind}, {source.dtype}), {cfg.num_layers} layers, streamed "
         f"one layer at a time in {dtype} ({len(passes)} pass{'es' if len(passes) > 1 else ''}: "
         f"{', '.join(passes)})")
    ctx = Context(tokenizer=tokenizer, calibration=recipe.calibration, data_dir=data_dir,
                  progress=progress)
    tokens = ctx.calibration_tokens() if recipe.pipeline.needs_calibration else None
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
        resumed = (state.pass_index, state.done)
        if state.done or state.pass_index:
            where = f"pass {resumed[0] + 1} of {len(passes)} ({passes[min(resumed[0], len(passes) - 1)]}): " \
                if len(passes) > 1 else ""
            echo(f"resume    {where}{state.done} of {cfg.num_layers} layers done by an earlier "
                 f"run; starting at layer {state.done}")
        writer, timings = run_plan(steps, source, tokens, tmp, ctx, param_dtype=DTYPES[dtype],
                                   state=state)
        state.clear()
        writer.finish(tokenizer)
    seconds = time.perf_counter() - t1
    report = _report(recipe, steps, ctx, writer.config, name=name, source=source, dtype=dtype,
                     out=out, seconds={"prune": seconds, "total": time.perf_counter() - t0,
                                       "per_layer": timings["per_layer"]}, resumed=resumed)
    sparsity = f", mean sparsity {report['sparsity']:.2%}" if "sparsity" in report else ""
    echo(f"pruned    {cfg.num_layers} -> {writer.config.num_layers} layers, hidden "
         f"{cfg.hidden_size} -> {writer.config.hidden_size}, in {seconds:.1f} s{sparsity}; "
         f"peak RSS {report['peak_rss_gb']:.2f} GB")
    echo(f"wrote     {out}")
    if report_path is not None:
        atomic.write_json(report_path, report)
        echo(f"wrote     {report_path}")
    return report


def _report(recipe: Recipe, steps, ctx: Context, pruned, *, name, source, dtype, out, seconds,
            resumed) -> dict[str, Any]:
    """The streamed run's report: what ran, the pruned shapes, sparsity, seconds, memory."""
    report = {
        "recipe": {"name": recipe.name, "path": recipe.path, "settings": recipe.to_dict()},
        "model": name, "source": str(source.path), "streamed": True, "dtype": dtype,
        "output_dtype": source.dtype, "output": str(out),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "methods": [s.kind for s in steps], "method": steps[-1].kind,
        "pruned": {"hidden_size": pruned.hidden_size, "num_layers": pruned.num_layers,
                   "layers": [{"num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
                               "intermediate_size": s.intermediate_size} for s in pruned.layers]},
        "transforms": ctx.report.get("transforms", []), "seconds": seconds,
        "resumed_at_pass": resumed[0], "resumed_at_layer": resumed[1],
        "peak_rss_bytes": peak_rss_bytes(), **memory_peaks(),
    }
    if steps[-1].kind in SPARSITY:
        entry = [t for t in report["transforms"] if "mean_sparsity" in t][-1]
        report.update(pattern=steps[-1].pattern or "unstructured",
                      target_sparsity=steps[-1].target_sparsity(), sparsity=entry["mean_sparsity"])
    return report
