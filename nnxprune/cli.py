"""The `nnxprune` command.

    nnxprune eval MODEL --dataset wikitext2 --seqlen 1024 --max-windows 32 --json OUT.json
    nnxprune generate MODEL "PROMPT" --max-new-tokens 32
    nnxprune export MODEL OUT_DIR [--format hf|checkpoint]
    nnxprune models
    nnxprune train CKPT --recipe RECIPE --out OUT_DIR --json REPORT [--distributed]
    nnxprune importance MODEL --score block_influence --score activation --json OUT --png OUT

`MODEL` is a model card name (`nnxprune models` lists them), a Hugging Face folder, a GGUF file or
an nnxprune checkpoint. Bad input (unknown card, missing file, unsupported architecture, a window
longer than the model's context, a missing data folder, an output that would replace something
nnxprune did not write) is reported on one line with exit status 2, before any work and without
writing anything; outputs are written atomically at the end (`nnxprune.io.atomic`).
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

from nnxprune import multihost, preflight, streamed
from nnxprune.cli_args import build_parser
from nnxprune.errors import UserError

EXIT_USER_ERROR = 2

# -- helpers ---------------------------------------------------------------------------------------
def _load(args, *, with_tokenizer: bool = True):
    import jax.numpy as jnp

    from nnxprune.io.load import load_model
    from nnxprune.measure import count_params

    preflight.check_model(args.model, with_tokenizer=with_tokenizer, chat=getattr(args, "chat", False))
    t0 = time.perf_counter()
    loaded = load_model(args.model, param_dtype=getattr(jnp, args.dtype),  # float32 | bfloat16
                        with_tokenizer=with_tokenizer)

    cfg = loaded.model.config
    print(f"model     {loaded.source} ({loaded.kind}): {cfg.num_layers} layers, hidden "
          f"{cfg.hidden_size}, {count_params(loaded.model) / 1e6:.1f}M parameters, "
          f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    return loaded


# -- commands --------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from nnxprune import data as data_lib
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io import atomic
    from nnxprune.measure import memory_peaks

    overrides = {"seqlen": args.seqlen, "max_windows": args.max_windows, "batch_size": args.batch_size}
    if args.split:
        overrides["split"] = args.split
    protocol = protocol_for(args.dataset, **overrides)
    if args.host_memory_gb is not None and (not args.stream or not args.host_memory_gb > 0):
        raise UserError("--host-memory-gb takes a positive number of GB, with --stream")
    data_dir = data_lib.resolve_data_dir(args.data_dir)
    data_lib.check_available(protocol.dataset, protocol.split, data_dir)
    atomic.check_outputs(files=[args.json], overwrite=args.overwrite)
    preflight.check_eval(args, protocol)
    result, source = (_eval_streamed if args.stream else _eval_in_memory)(args, protocol, data_dir)
    peaks = memory_peaks()
    print(f"ppl       {result.ppl:.4f}  (mean NLL {result.nll:.5f} over {result.predicted_tokens:,} "
          f"predicted tokens, {result.windows} windows)")
    print(f"speed     {result.tokens_per_second:,.0f} tokens/s ({result.tokens:,} tokens in "
          f"{result.seconds:.1f} s; compile {result.compile_seconds:.1f} s); peak RSS "
          f"{peaks['peak_rss_gb']:.2f} GB")
    if args.json:
        report = {"model": args.model, "source": source, "dtype": args.dtype,
                  "streamed": args.stream, **result.to_dict(), **peaks}
        atomic.write_json(args.json, report)
        print(f"wrote     {args.json}")
    return 0


def _eval_in_memory(args, protocol, data_dir):
    from nnxprune.evaluate.perplexity import evaluate_perplexity

    loaded = _load(args)
    print(f"protocol  {protocol.describe()}", flush=True)
    return evaluate_perplexity(loaded.model, loaded.tokenizer, protocol, data_dir=data_dir,
                               progress=not args.no_progress), loaded.source


def _eval_streamed(args, protocol, data_dir):
    """`eval --stream`: one decoder layer in memory at a time (`nnxprune.evaluate.streamed`)."""
    import jax.numpy as jnp

    from nnxprune.evaluate.streamed import HOST_MEMORY_BYTES, evaluate_streamed
    from nnxprune.io.layers import open_layers
    from nnxprune.io.load import load_tokenizer

    preflight.check_model(args.model)
    source = open_layers(args.model)
    cfg = source.config
    print(f"model     {source.path} ({source.kind}, {source.dtype}): {cfg.num_layers} layers, "
          f"hidden {cfg.hidden_size}, streamed one layer at a time in {args.dtype}", flush=True)
    print(f"protocol  {protocol.describe()}", flush=True)
    budget = HOST_MEMORY_BYTES if args.host_memory_gb is None else int(args.host_memory_gb * 1e9)
    result = evaluate_streamed(source, load_tokenizer(source.path, source.kind), protocol,
                               data_dir=data_dir, param_dtype=jnp.dtype(args.dtype),
                               progress=not args.no_progress, host_memory_bytes=budget)
    return result, str(source.path)


def cmd_generate(args) -> int:
    from nnxprune.generate import generate_text

    preflight.check_generate(args)  # PROMPT and every option, before loading
    loaded = _load(args)
    result = generate_text(loaded.model, loaded.tokenizer, args.prompt,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat)
    print(f"--- {result.prompt_tokens} prompt tokens, {len(result.tokens)} new "
          f"({'greedy' if args.temperature == 0 else f'sampled, T={args.temperature}'})")
    print(args.prompt + result.text if not args.chat else result.text)
    print(f"--- {result.tokens_per_second:.1f} tokens/s decoding "
          f"(prefill {result.prefill_seconds:.2f} s, compile {result.compile_seconds:.1f} s)")
    return 0


def cmd_export(args) -> int:
    from nnxprune.io import atomic
    from nnxprune.io.export import export_target, write_export

    # one output, one format (conflicts refused), checked before loading; a full disk: one line
    out, fmt = export_target(args.out, args.hf, args.checkpoint, getattr(args, "format", None))
    atomic.check_outputs(folders=[out], overwrite=args.overwrite)
    written = write_export(_load(args), out, fmt, overwrite=args.overwrite)
    print(f"wrote     {written} ({fmt})")
    return 0


def _distributed(args, cluster) -> None:
    if cluster is not None:
        from nnxprune.recovery.sharding import initialize_distributed

        initialize_distributed(cluster, label=f"nnxprune {args.command}")


def cmd_prune(args) -> int:
    from nnxprune.recipes import load_recipe
    from nnxprune.runner import check_recipe, run_recipe

    cluster = multihost.cluster_from(args)  # --distributed's options, before any work
    recipe = load_recipe(args.recipe, args.set or [])
    if args.check:  # dry run: the recipe against the model's config, no weights, nothing written
        check_recipe(recipe, model=args.model, stream=args.stream, dtype=args.dtype,
                     memory_budget=args.memory_budget)
        return 0
    if args.resume and not args.stream:
        raise UserError("--resume continues an unfinished --stream run: pass --stream too")
    if args.stream:  # one decoder layer in memory at a time (nnxprune.streamed)
        streamed.run_streamed_recipe(recipe, model=args.model, out=args.out, report_path=args.json,
                                     data_dir=args.data_dir, dtype=args.dtype, resume=args.resume,
                                     progress=not args.no_progress, overwrite=args.overwrite)
        return 0
    _distributed(args, cluster)
    run_recipe(recipe, model=args.model, out=args.out, report_path=args.json, train_dir=args.train_dir,
               data_dir=args.data_dir, progress=not args.no_progress, views=not args.no_views,
               overwrite=args.overwrite, dtype=args.dtype)  # all checked before loading
    return 0


def cmd_train(args) -> int:
    from nnxprune.recipes import load_recipe
    from nnxprune.recovery.run import run_train

    cluster = multihost.cluster_from(args)  # --distributed's options, before any work
    recipe = load_recipe(args.recipe, args.set or [])
    _distributed(args, cluster)
    run_train(args.model, recipe, out=args.out, report_path=args.json, teacher=args.teacher,
              train_dir=args.train_dir, data_dir=args.data_dir, progress=not args.no_progress,
              overwrite=args.overwrite)  # outputs, data, shapes and teacher checked before loading
    return 0


def cmd_lm_eval(args) -> int:
    from nnxprune.io import atomic

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks: give at least one task name")
    atomic.check_outputs(files=[args.json], overwrite=args.overwrite)
    from nnxprune.evaluate import lmeval

    prepared = preflight.check_lm_eval(args, tasks)  # options, tasks and their data, before loading
    loaded = _load(args)
    lm = lmeval.NnxpruneLM(loaded=loaded, batch_size=args.batch_size, max_length=args.max_length)
    t0 = time.perf_counter()
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    out = lmeval.run_tasks(lm, tasks, include_path=args.include_path, limit=limit,
                           num_fewshot=args.num_fewshot, seed=args.seed, prepared=prepared)
    out["seconds"] = time.perf_counter() - t0
    print(lmeval.results_table(out["results"]))
    print(f"time      {out['seconds']:.1f} s; {out['compiled_shapes']} compiled scoring shapes")
    if args.json:
        atomic.write_json(args.json, {"model": args.model, "source": loaded.source, **out})
        print(f"wrote     {args.json}")
    return 0


def cmd_inspect(args) -> int:
    from nnxprune.inspect import inspect_model
    from nnxprune.io import atomic

    atomic.check_outputs(files=[args.html, args.markdown, args.png], overwrite=args.overwrite)
    source_config = preflight.inspect_source(args)  # --source's or the recorded one, checked
    loaded = _load(args, with_tokenizer=False)
    summary = inspect_model(loaded.model, source_config=source_config, html=args.html,
                            markdown=args.markdown, png=args.png, title=f"nnxprune inspect {args.model}")
    print(summary.to_text(matrices=args.matrices))
    for label, path in (("html", args.html), ("markdown", args.markdown), ("png", args.png)):
        if path:
            print(f"wrote     {path} ({label})")
    return 0


def cmd_importance(args) -> int:
    from nnxprune import data as data_lib
    from nnxprune.inspect.importance import calibration_for, check_scores, write_importance
    from nnxprune.io import atomic

    calibration = calibration_for(args.set or [], scores := check_scores(args.score))
    data_dir = data_lib.resolve_data_dir(args.data_dir)
    atomic.check_outputs(files=[args.json, args.png], overwrite=args.overwrite)
    preflight.check_importance(args, calibration, data_dir)
    write_importance(_load(args), scores, calibration, data_dir=data_dir, json_path=args.json,
                     png_path=args.png, batch_size=args.batch_size, progress=not args.no_progress,
                     name=args.model)
    return 0


def cmd_models(args) -> int:
    from nnxprune.io.load import describe_cards

    print(describe_cards())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from nnxprune.interrupt import Interrupted, handled
    from nnxprune.io.atomic import run_outputs

    args = build_parser().parse_args(argv)
    func = globals()[args.handler]  # the parser names each subcommand's cmd_* function
    try:  # signals stop the run at a safe point; outputs are checked again when written
        with handled(), run_outputs():
            return func(args)
    except UserError as e:
        print(f"nnxprune {args.command}: error: {e}", file=sys.stderr)
        multihost.fail(str(e), EXIT_USER_ERROR)  # --distributed: the other processes stop too
        return EXIT_USER_ERROR
    except Interrupted as e:
        print(f"nnxprune: {e}; outputs not finished were not written", file=sys.stderr)
        multihost.fail(str(e), int(e.code))
        return int(e.code)
    except KeyboardInterrupt:
        print("nnxprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
