"""The `nnxprune` command line: one parser builder per subcommand.

Each subcommand names its handler in `nnxprune.cli` by `handler` (resolved there), so this module
imports nothing of the library beyond the argument helpers of `multihost` and `streamed`.
"""

from __future__ import annotations

import argparse

from nnxprune import multihost, streamed

_MODEL_HELP = ("a model card name (see `nnxprune models`), a Hugging Face folder (config.json + "
               "safetensors), a .gguf file, or an nnxprune checkpoint folder")



# -- parser: one function per command -------------------------------------------------------------
_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def _model_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose first argument is a MODEL (with --dtype)."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=_FORMAT)
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="parameter dtype after loading (GGUF weights are dequantized to it)")
    return p


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs nnxprune did not write (by default only its own "
                        "earlier outputs are replaced; anything else is refused)")


def _add_eval(sub) -> None:
    p = _model_command(sub, "eval", "Perplexity under a pinned protocol (dataset, split, join rule, "
                                    "windows); prints the protocol beside the number.")
    p.add_argument("--dataset", choices=["wikitext2", "c4"], default="wikitext2",
                   help="wikitext2: HF wikitext-2-raw-v1 rows joined with '\\n\\n'; c4: C4 "
                        "validation documents")
    p.add_argument("--split", default=None, help="dataset split (default: test for wikitext2, "
                                                 "validation for c4)")
    p.add_argument("--seqlen", type=int, default=1024,
                   help="tokens per window (non-overlapping; the partial tail is dropped)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="score only the first N windows (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--data-dir", default=None,
                   help="folder with wiki.test.raw / c4_validation_2k.parquet (default: "
                        "$NNXPRUNE_DATA_DIR, else the Hugging Face hub)")
    p.add_argument("--json", metavar="OUT", default=None,
                   help="also write the result (ppl, protocol, tokens, seconds, ...) as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--stream", action="store_true",
                   help="one decoder layer in memory at a time, read from the model's files (HF "
                        "folder or GGUF); the windows' hidden states stay on the host; same number")
    p.add_argument("--host-memory-gb", type=float, default=None,
                   help="with --stream: host memory for the windows' hidden states (float32); "
                        "more windows than fit go in chunks, each reading every layer again "
                        "(default: 4 GiB)")
    _add_overwrite(p)
    p.set_defaults(handler="cmd_eval")


def _add_generate(sub) -> None:
    p = _model_command(sub, "generate",
                       "Generate text from a prompt (greedy by default; KV cache, jitted).")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most "
                                                                   "(stops early at EOS)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.set_defaults(handler="cmd_generate")


def _add_export(sub) -> None:
    p = _model_command(sub, "export", "Write MODEL as a Hugging Face folder (masks folded; uniform "
                                      "shapes give a plain LlamaForCausalLM, heterogeneous ones an "
                                      "nnxprune_llama folder with per-layer sizes) or as an "
                                      "nnxprune checkpoint (masks kept).")
    p.add_argument("out", metavar="OUT_DIR", nargs="?", default=None,
                   help="output folder (replaces only an earlier nnxprune output; see "
                        "--overwrite); or use --hf / --checkpoint")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--hf", metavar="OUT_DIR", default=None, help="write a Hugging Face folder")
    group.add_argument("--checkpoint", metavar="OUT_DIR", default=None,
                       help="write an nnxprune checkpoint")
    p.add_argument("--format", choices=["hf", "checkpoint"], default=argparse.SUPPRESS,
                   help="format for the positional OUT_DIR (default: hf; must agree with --hf / "
                        "--checkpoint)")
    _add_overwrite(p)
    p.set_defaults(handler="cmd_export")


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", formatter_class=_FORMAT,
                       help="Run a recipe: prune MODEL, evaluate dense and pruned, save and report.",
                       description="Run a recipe file (recipes/*.toml): validate everything, "
                                   "evaluate the dense model, apply the pruning pipeline, evaluate "
                                   "again, write an nnxprune checkpoint and a JSON + Markdown report.")
    p.add_argument("recipe", metavar="RECIPE", help="a recipe TOML file")
    p.add_argument("--model", default=None, help=_MODEL_HELP + " (default: the recipe's [recipe] model)")
    p.add_argument("--out", default=None, help="checkpoint folder to write (replaces only an "
                                               "earlier nnxprune output; see --overwrite)")
    p.add_argument("--json", metavar="REPORT", default=None,
                   help="report JSON to write (a Markdown twin is written beside it)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set eval.seqlen=1024 or "
                        "--set prune.0.fraction=0.3 (repeatable; values are TOML)")
    p.add_argument("--data-dir", default=None, help="folder with the evaluation / calibration "
                                                    "data (default: $NNXPRUNE_DATA_DIR, else the hub)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-views", action="store_true",
                   help="skip the treescope HTML view and PNG plot written beside the report")
    p.add_argument("--train-dir", default=None,
                   help="recovery logs (metrics.jsonl, loss.png) and resumable checkpoints "
                        "(default: REPORT.train/ beside the report)")
    multihost.add_arguments(p)  # --distributed, --coordinator, --num-processes, --process-id
    p.add_argument("--check", action="store_true",
                   help="dry run: validate the recipe against the model's config, print the "
                        "predicted shapes and parameter count; loads no weights, writes nothing")
    p.add_argument("--memory-budget", type=float, metavar="GB", default=None,
                   help="with --check: the memory the run may use (default: what this machine "
                        "has available); a predicted peak above it is reported with settings "
                        "that fit")
    streamed.add_stream_arguments(p)  # --stream, --resume, --dtype
    _add_overwrite(p)
    p.set_defaults(handler="cmd_prune")


def _add_train(sub) -> None:
    p = sub.add_parser("train", formatter_class=_FORMAT,
                       help="Run a recipe's [recovery] alone on a (pruned) model: distillation, "
                            "LoRA or continued pretraining, sharded over the devices.",
                       description="Recovery training alone: load MODEL (usually a pruned "
                                   "checkpoint), evaluate, train with the recipe's [recovery] "
                                   "settings (masks held), evaluate again, write a checkpoint "
                                   "and a JSON + Markdown report.")
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--recipe", required=True, help="a recipe TOML file with a [recovery] section")
    p.add_argument("--out", default=None, help="checkpoint folder to write (replaces only an "
                                               "earlier nnxprune output; see --overwrite)")
    p.add_argument("--json", metavar="REPORT", default=None,
                   help="report JSON to write (a Markdown twin is written beside it)")
    p.add_argument("--teacher", default=None,
                   help="distillation teacher (default: recovery.distill.teacher, else the "
                        "checkpoint's recorded source model)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set recovery.steps=50 (repeatable)")
    p.add_argument("--train-dir", default=None,
                   help="metrics.jsonl, loss.png and resumable checkpoints (default: "
                        "REPORT.train/, else OUT.train/); a run finding checkpoints there resumes")
    p.add_argument("--data-dir", default=None, help="folder with the training / evaluation data "
                                                    "(default: $NNXPRUNE_DATA_DIR, else the hub)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    multihost.add_arguments(p)  # --distributed, --coordinator, --num-processes, --process-id
    _add_overwrite(p)
    p.set_defaults(handler="cmd_train")


def _add_lm_eval(sub) -> None:
    p = _model_command(sub, "lm-eval", "Zero-shot / few-shot accuracy through lm-evaluation-harness "
                                       "(the `nnxprune` lm-eval model: exact log-likelihoods, "
                                       "bucketed and batched); prints a Markdown table.")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", metavar="DIR", default=None,
                   help="folder of local task YAMLs; when every task is there, lm-eval's built-in "
                        "task index is not built (standard task names need the hub)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (an integer), or a fraction of them (< 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="rows per scoring forward")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest model input in tokens (default: the model's context)")
    p.add_argument("--seed", type=int, default=0, help="seed of lm-eval's few-shot sampling")
    p.add_argument("--json", metavar="OUT.json", default=None, help="write the results here")
    _add_overwrite(p)
    p.set_defaults(handler="cmd_lm_eval")


def _add_inspect(sub) -> None:
    p = _model_command(sub, "inspect", "Show a model's architecture and sparsity: per-layer table "
                                       "(heads, KV heads, MLP width, parameters, sparsity, N:M "
                                       "pattern), a treescope HTML view and a PNG plot.")
    p.add_argument("--html", metavar="OUT.html", default=None,
                   help="treescope view with every Linear annotated (shape, sparsity, pattern)")
    p.add_argument("--markdown", metavar="OUT.md", default=None, help="the tables as Markdown")
    p.add_argument("--png", metavar="OUT.png", default=None,
                   help="plot of per-layer widths and sparsity")
    p.add_argument("--source", metavar="MODEL", default=None,
                   help="the unpruned model, for ratios (default: the checkpoint's recorded source)")
    p.add_argument("--matrices", action="store_true", help="also list every matrix")
    _add_overwrite(p)
    p.set_defaults(handler="cmd_inspect")


def _add_importance(sub) -> None:
    p = _model_command(sub, "importance", "Score layers, heads, MLP neurons and hidden channels "
                                          "from one calibration pass; write JSON and a plot.")
    p.add_argument("--score", action="append", required=True,
                   help="block_influence, activation or taylor; repeatable, one pass")
    p.add_argument("--json", metavar="OUT", default=None, help="scores and protocol (JSON)")
    p.add_argument("--png", metavar="OUT", default=None, help="plot of the scores")
    p.add_argument("--set", action="append", metavar="calibration.KEY=VALUE",
                   help="calibration (default c4 32 x 1024 seed 0; taylor alone: 10 x 64)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--data-dir", default=None, help="calibration data folder ($NNXPRUNE_DATA_DIR)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_overwrite(p)
    p.set_defaults(handler="cmd_importance")


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="List the model cards (names usable as MODEL).",
                       formatter_class=_FORMAT)
    p.set_defaults(handler="cmd_models")


COMMANDS = (_add_eval, _add_generate, _add_export, _add_prune, _add_train, _add_lm_eval,
            _add_inspect, _add_importance, _add_models)  # in the order `nnxprune --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnxprune", description="Prune Llama-family language models by structural surgery (Flax NNX).",
        formatter_class=_FORMAT)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser
