"""Recovery as a step of a run: `nnxprune prune` (after the transforms) and `nnxprune train`.

`recover` trains a model with a recipe's `[recovery]` settings and returns the report entry
(losses, held-out evaluations, speed, mesh, where the logs went). `run_train` is `nnxprune train
CKPT --recipe R`: recovery alone on a saved (pruned) model, perplexity before and after under the
recipe's `[eval]` protocol, the trained model saved as an nnxprune checkpoint (masks kept, LoRA
merged) and a JSON + Markdown report.

Example:
    >>> entry = recover(pruned, recipe.recovery, tokenizer=tok, teacher=dense, log_dir="out/r.train")
    >>> report = run_train("out/wanda-2of4", load_recipe("recipes/wanda-2of4-distill.toml"),
    ...                    out="out/kd", report_path="out/kd.json")
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

from nnxprune import data as data_lib
from nnxprune import multihost
from nnxprune.data.domains import check_domains, load_domain_windows
from nnxprune.data.sources import file_documents, resolve_dataset
from nnxprune.data.training import instruction_records, instruction_windows
from nnxprune.errors import UserError
from nnxprune.evaluate.perplexity import evaluate_perplexity
from nnxprune.io import atomic
from nnxprune.io.checkpoint import is_checkpoint, read_meta, save_checkpoint
from nnxprune.io.load import load_model, peek_config, source_label
from nnxprune.measure import count_params, measured_sparsity, memory_peaks
from nnxprune.recovery import sharding as sh
from nnxprune.recovery import sheared_handoff as handoff
from nnxprune.recovery.teacher_correction import correct_teacher
from nnxprune.recovery.trainer import train


def default_train_dir(out, report_path) -> Path:
    """Where metrics.jsonl, loss.png and checkpoints go when no --train-dir is given."""
    if report_path is not None:
        return atomic.sibling(report_path, ".train")
    return Path(str(out).rstrip("/") + ".train")


def source_model(source: str | None, checkpoint: str | Path | None = None) -> str | None:
    """The loadable MODEL of a checkpoint's recorded source (`card NAME: path` -> NAME). A relative
    path (checkpoints before `source_model` was recorded) that does not exist from here is tried
    relative to the checkpoint's folder."""
    if not source:
        return None
    if source.startswith("card ") and ":" in source:
        return source[len("card "):].split(":", 1)[0].strip()
    path = Path(source)
    if checkpoint is not None and not path.is_absolute() and not path.exists():
        beside = Path(checkpoint).resolve().parent / path
        if beside.exists():
            return str(beside)
    return source


def recorded_source(checkpoint: str | Path) -> str | None:
    """The source MODEL a checkpoint records (`source_model`, else the older `source`)."""
    provenance = read_meta(checkpoint).get("provenance", {})
    if not isinstance(provenance, dict):
        return None
    name = provenance.get("source_model") or provenance.get("source")
    return source_model(name, checkpoint) if isinstance(name, str) else None


def check_data(cfg, data_dir) -> None:
    """Fails fast (UserError) when the recovery's data could not be read (`cfg.dataset`, or every
    domain of `cfg.domains`). A local file is read and checked record by record now, before the
    model loads: instruction records with `cfg.prompt_template`, else documents. Tokenizes
    nothing."""
    if cfg.domains:
        check_domains(cfg.domains, data_dir)
        return
    if cfg.stream is not None:  # streamed: the files' first documents are read, not all
        data_lib.check_stream(cfg.dataset, data_dir)
        return
    data_lib.check_source(cfg.dataset, data_dir)
    if cfg.prompt_template:
        instruction_records(cfg.dataset, heldout_windows=cfg.eval_batches * cfg.micro_batch,
                            batch_size=cfg.batch_size)
    elif (dataset := resolve_dataset(cfg.dataset)).kind == "file":
        file_documents(dataset.path)


def training_windows(cfg, tokenizer, data_dir):
    """The recovery's token windows (with `cfg.domains`, `{domain: TokenWindows}`), read and
    tokenized now: an unreadable dataset (a hub name while offline, a damaged file) fails before
    any evaluation."""
    if cfg.domains:
        return load_domain_windows(
            cfg.domains, tokenizer, seqlen=cfg.seqlen, train_windows=cfg.steps * cfg.batch_size,
            heldout_windows=cfg.eval_batches * cfg.micro_batch, data_dir=data_dir)
    if cfg.stream is not None:  # read while training (data.grain_stream), never packed here
        return None
    if cfg.prompt_template:  # instruction records, one per window, prompt masked (data.training)
        return instruction_windows(
            tokenizer, cfg.dataset, seqlen=cfg.seqlen, train_windows=cfg.steps * cfg.batch_size,
            heldout_windows=cfg.eval_batches * cfg.micro_batch)
    return data_lib.load_windows(
        tokenizer, cfg.dataset, seqlen=cfg.seqlen, train_windows=cfg.steps * cfg.batch_size,
        heldout_windows=cfg.eval_batches * cfg.micro_batch, data_dir=data_dir)


def recover(model, cfg, *, tokenizer, teacher=None, data_dir=None, log_dir=None,
            progress: bool = True, echo=print, windows=None) -> dict[str, Any]:
    """Trains `model` in place; returns the report entry of the run."""
    data = (f"{len(cfg.domains)} domains ({'dynamic' if cfg.dynamic else 'fixed'} weights)"
            if cfg.domains else cfg.dataset)
    echo(f"recovery  {cfg.kind}: {cfg.steps} steps x {cfg.batch_size} x {cfg.seqlen} tokens on "
         f"{data}, lr {cfg.lr:g}, {cfg.compute_dtype}, mesh {cfg.mesh.describe()}")
    t0 = time.perf_counter()
    teacher, correction = correct_teacher(teacher, cfg, tokenizer=tokenizer, windows=windows,
                                          data_dir=data_dir, echo=echo)
    result = train(model, cfg, tokenizer=tokenizer, teacher=teacher, data_dir=data_dir,
                   log_dir=log_dir, progress=progress, echo=echo, windows=windows)
    entry = {"settings": cfg.to_dict(), **result.to_dict(), "wall_seconds": time.perf_counter() - t0,
             **({"teacher_correction": correction} if correction else {})}
    last_eval = result.evals[-1] if result.evals else {}
    if result.losses:
        echo(f"recovery  loss {entry['first_loss']:.4f} -> {entry['final_loss']:.4f}"
             + (f", held-out {last_eval['loss']:.4f}" if last_eval else "")
             + f"; {result.tokens_per_second:,.0f} tokens/s; logs in {log_dir}")
    else:
        echo(f"recovery  nothing left to train (checkpoint at step {result.resumed_from})")
    return entry


def _teacher_name(model_name: str, cfg, teacher: str | None) -> str | None:
    if cfg.kind != "distill":
        return None
    name = teacher or cfg.distill.teacher or None
    if name is None and is_checkpoint(Path(model_name)):
        name = recorded_source(model_name)
    if not name:
        raise UserError("distillation needs a teacher: pass --teacher MODEL or set "
                        "recovery.distill.teacher")
    return name


def _preflight(model_name: str, recipe, *, out, report_path, teacher, train_dir, data_dir,
               overwrite: bool):
    """Every check of `nnxprune train` that needs no weights; returns (data folder, teacher)."""
    cfg = recipe.recovery
    if cfg is None:
        raise UserError("the recipe has no [recovery] section")
    if out is None and report_path is None:
        raise UserError("nothing would be written: pass --out and/or --json")
    files = [report_path, atomic.sibling(report_path, ".md")] if report_path is not None else []
    atomic.check_outputs(folders=[out], files=files, overwrite=overwrite)
    atomic.check_log_dir(train_dir or default_train_dir(out, report_path), overwrite=overwrite,
                         outputs=[out, *files])
    data_dir = data_lib.resolve_data_dir(data_dir)
    check_data(cfg, data_dir)
    if cfg.lora is not None and not cfg.lora.merge and out is not None:
        raise UserError("recovery.lora.merge = false keeps the adapters outside the kernels, but "
                        "checkpoints hold plain projections: set merge = true or drop --out")
    if recipe.eval is not None:
        data_lib.check_available(recipe.eval.dataset, recipe.eval.split, data_dir)
    teacher_name = _teacher_name(model_name, cfg, teacher)
    student = peek_config(model_name)
    if student is not None:  # shapes, mesh, LoRA targets and the teacher, before loading weights
        if recipe.eval is not None and recipe.eval.seqlen > student.max_position_embeddings:
            raise UserError(f"eval.seqlen {recipe.eval.seqlen} is beyond the model's context of "
                            f"{student.max_position_embeddings} tokens")
        cfg.check(student)
        teacher_config = peek_config(teacher_name) if teacher_name else None
        if teacher_config is not None:
            cfg.check_teacher(student, teacher_config)
    return data_dir, teacher_name


@atomic.run_outputs()  # outputs checked at startup are checked again when written
def run_train(model_name: str, recipe, *, out=None, report_path=None, teacher: str | None = None,
              train_dir=None, data_dir=None, progress: bool = True, echo=print,
              overwrite: bool = False) -> dict[str, Any]:
    """`nnxprune train`: see the module docstring. In a multi-process run (`--distributed`) every
    process runs it; process 0 alone prints, shows progress and writes the report. The report's
    `peak_rss_gb` is this process's peak resident memory since it started and `device_peak_gb`
    its first accelerator's peak bytes in use (None on CPU), in GB (`measure.memory_peaks`)."""
    if not multihost.is_primary():
        echo, progress = (lambda *a, **k: None), False
    cfg = recipe.recovery
    data_dir, teacher_name = _preflight(model_name, recipe, out=out, report_path=report_path,
                                        teacher=teacher, train_dir=train_dir, data_dir=data_dir,
                                        overwrite=overwrite)
    cfg, seeded = handoff.seed_from_checkpoint(cfg, model_name)  # Sheared's domain weights
    t0 = time.perf_counter()
    loaded = load_model(model_name)
    model, tokenizer = loaded.model, loaded.tokenizer
    cfg.check(model.config)  # mesh, batch, LoRA targets, before any work
    teacher_model = None
    if teacher_name:
        teacher_model = load_model(teacher_name, with_tokenizer=False).model
        cfg.check_teacher(model.config, teacher_model.config)
        echo(f"teacher   {teacher_name}: {teacher_model.config.num_layers} layers, "
             f"{count_params(teacher_model) / 1e6:.1f}M parameters")
    windows = training_windows(cfg, tokenizer, data_dir)  # before the first evaluation
    report: dict[str, Any] = {
        "command": "train", "model": model_name, "source": loaded.source, "teacher": teacher_name,
        "recipe": {"name": recipe.name, "path": recipe.path, "settings": recipe.to_dict()},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "before": {"params": count_params(model), "sparsity": measured_sparsity(model)["overall"]},
        "seconds": {"load": time.perf_counter() - t0},
    }
    if recipe.eval is not None:
        report["eval_protocol"] = recipe.eval.to_dict()
        report["eval_protocol_text"] = recipe.eval.describe()
        report["before"].update(evaluate_perplexity(
            model, tokenizer, recipe.eval, data_dir=data_dir, progress=progress).summary())
        echo(f"before    ppl {report['before']['ppl']:.4f}")
    log_dir = Path(train_dir) if train_dir else default_train_dir(out, report_path)
    report["recovery"] = recover(model, cfg, tokenizer=tokenizer, teacher=teacher_model,
                                 data_dir=data_dir, log_dir=log_dir, progress=progress, echo=echo,
                                 windows=windows)
    if seeded:
        report["recovery"]["initial_weights_from"] = seeded
    del teacher_model
    report["after"] = {"params": count_params(model), "sparsity": measured_sparsity(model)["overall"]}
    if recipe.eval is not None:
        report["after"].update(evaluate_perplexity(
            model, tokenizer, recipe.eval, data_dir=data_dir, progress=progress).summary())
        echo(f"after     ppl {report['after']['ppl']:.4f}")
    if out is not None:
        if multihost.joined():  # Orbax's multi-process save: each process writes its shards
            sh.place_model(model, sh.make_mesh(cfg.check(model.config)))
        save_checkpoint(model, out, tokenizer=tokenizer,
                        provenance={"source": loaded.source, "source_model": (
                            recorded_source(loaded.path) if loaded.kind == "checkpoint" else None)
                            or source_label(loaded),
                                    "recovery": cfg.to_dict(), "recipe_path": recipe.path})
        report["checkpoint"] = str(out)
        echo(f"wrote     {out}")
    report["seconds"]["total"] = time.perf_counter() - t0
    report.update(memory_peaks())  # after the save: the whole run's peak
    if report_path is not None:
        atomic.write_json(report_path, report)
        atomic.write_text(atomic.sibling(report_path, ".md"), markdown(report))
        echo(f"wrote     {report_path} (and {atomic.sibling(report_path, '.md')})")
    echo(markdown(report))
    multihost.done()  # a multi-process run: this process's silence from now on is no failure
    return report


def markdown(report: dict[str, Any]) -> str:
    """Before / after table of `nnxprune train`."""
    rec, before, after = report["recovery"], report["before"], report["after"]
    lines = [f"# recovery ({rec['settings']['kind']}) of {report['model']}", "",
             "| | before | after |", "|---|---|---|",
             f"| sparsity of the decoder projections | {before['sparsity']:.2%} | "
             f"{after['sparsity']:.2%} |"]
    if "ppl" in before:
        lines.append(f"| perplexity | {before['ppl']:.3f} | {after['ppl']:.3f} |")
    if rec["losses"]:
        lines += ["", f"{rec['steps']} steps, training loss {rec['first_loss']:.4f} -> "
                      f"{rec['final_loss']:.4f}, {rec['tokens_per_second']:,.0f} tokens/s, mesh "
                      f"{rec['mesh']}."]
    if rec.get("domains"):
        lines += ["", *domain_table(rec["domains"])]
    if report.get("eval_protocol_text"):
        lines.append(f"Protocol: {report['eval_protocol_text']}.")
    if report.get("peak_rss_gb") is not None:
        lines.append(f"Peak memory {report['peak_rss_gb']:.2f} GB (the process's resident set).")
    return "\n".join(lines) + "\n"


def domain_table(domains: dict[str, Any]) -> list[str]:
    """Markdown rows of a domain run: each domain's reference, first and last held-out loss and
    its first and last weight."""
    first, last = domains["history"][0], domains["history"][-1]
    lines = [f"| domain | reference loss | held-out loss (step {first['step']} -> {last['step']}) "
             f"| weight | examples drawn |", "|---|---|---|---|---|"]
    for n in domains["names"]:
        lines.append(f"| {n} | {domains['reference_losses'][n]:.4f} ({domains['reference_from'][n]}) "
                     f"| {first['losses'][n]:.4f} -> {last['losses'][n]:.4f} | "
                     f"{domains['initial_weights'][n]:.3f} -> {last['weights'][n]:.3f} | "
                     f"{domains['draws'][n]} |")
    mode = "dynamic batch loading" if domains["dynamic"] else "fixed weights"
    return lines + ["", f"Domains with {mode}; mean excess loss {last['mean_excess']:.4f}."]
