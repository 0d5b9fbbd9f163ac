"""What the `nnxprune` commands check before any weight is loaded.

Everything that needs no weights is checked first, so bad input costs seconds, not a model load:
the model itself (its card, its config.json / nnxprune.json / GGUF header, its tokenizer files
and, for `generate --chat`, its chat template), each command's options against the model's
context (`eval --seqlen`, `generate --max-new-tokens`, `importance` calibration, `lm-eval
--max-length`), their ranges, the calibration data (readable, or the hub reachable) and lm-eval's
tasks (their data loaded). Each failure is a `UserError` naming the file or the option; the CLI
prints it on one line and exits with status 2.

Example:
    >>> check_model("smollm2-135m", chat=True)         # card, GGUF header, tokenizer, template
    >>> check_generate(args)                           # PROMPT and the sampling options
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from nnxprune.errors import UserError

# files one of which a model folder needs for a tokenizer (fast, SentencePiece or BPE vocab)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
_CHAT_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")


def _flag(name: str) -> str:
    """`max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def context_of(model: str | os.PathLike):
    """MODEL's `LlamaConfig` read without weights (`peek_config`), or None when that needs a
    download the hub cannot serve; a malformed card, config or metadata file is a UserError."""
    from nnxprune.io.load import peek_config

    return None if _hub_card_out_of_reach(model) else peek_config(model)


def _hub_card_out_of_reach(model) -> bool:
    """Whether MODEL is a hub card without a `[config]` while the hub cannot be reached and
    offline mode is off: its config.json would be fetched with retries for half a minute."""
    from nnxprune.io.load import read_card

    name = str(model)
    if Path(name).exists() or os.sep in name or name.endswith((".gguf", ".safetensors", ".json")):
        return False
    card = read_card(name)
    if card.source["kind"] != "hub" or card.config:
        return False
    from huggingface_hub import constants

    from nnxprune.data.sources import _hub_reachable

    return not constants.HF_HUB_OFFLINE and not _hub_reachable()


def within_context(what: str, value: int, config) -> None:
    """UserError when `value` tokens (`what`) do not fit the model's context."""
    if config is not None and value > config.max_position_embeddings:
        raise UserError(f"{what} {value} is beyond the model's context of "
                        f"{config.max_position_embeddings} tokens")


# -- the model -------------------------------------------------------------------------------------
def check_model(model: str | os.PathLike, *, with_tokenizer: bool = True, chat: bool = False):
    """MODEL's config (or None, as `context_of`) after checking what loading it will read besides
    the weights: its card, config, and (`with_tokenizer`) the tokenizer files of a model on this
    machine; `chat` also wants a chat template. A hub card's tokenizer is checked on loading."""
    from nnxprune.io.load import local_model

    config = context_of(model)
    local = local_model(model) if with_tokenizer else None
    if local is not None:
        check_tokenizer(*local, chat=chat)
    return config


def check_tokenizer(path: Path, kind: str, *, chat: bool = False) -> None:
    """UserError naming the file when a model's tokenizer cannot be built: a GGUF file without
    a token list or without merges or scores; a folder without tokenizer files, with a
    `tokenizer.json` that the `tokenizers` library refuses, or a `tokenizer_config.json` that is
    not a JSON object. `chat`: no chat template is one too."""
    if kind == "gguf":
        from nnxprune.io.gguf import check_tokenizer as check_gguf

        check_gguf(path, chat=chat)
        return
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer in the folder (tokenizer.json or tokenizer.model); "
                        f"save one there with tokenizer.save_pretrained")
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        text = _text(path / "tokenizer.json")
        try:
            Tokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - the Rust parser raises plain Exceptions
            raise UserError(f"{path / 'tokenizer.json'}: not a valid tokenizer "
                            f"({str(e).strip()[:200] or type(e).__name__})") from None
    config = _json_object(path / "tokenizer_config.json")
    if chat and not config.get("chat_template") \
            and not any((path / name).exists() for name in _CHAT_FILES):
        raise UserError(f"--chat: the tokenizer in {path} has no chat template (no 'chat_template' "
                        f"in tokenizer_config.json, no chat_template.jinja); drop --chat")


def _text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start})") from None
    except OSError as e:
        raise UserError(f"{file}: cannot be read ({e.strerror or e})") from None


def _json_object(file: Path) -> dict[str, Any]:
    """The JSON object in `file` ({} when there is no such file)."""
    if not file.is_file():
        return {}
    try:
        value = json.loads(_text(file))
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


# -- commands --------------------------------------------------------------------------------------
def check_eval(args, protocol) -> None:
    """`nnxprune eval`: the window fits the model's context."""
    within_context("--seqlen", protocol.seqlen, context_of(args.model))


def check_generate(args) -> None:
    """`nnxprune generate`: PROMPT is text, the sampling options are in range and
    --max-new-tokens leaves room for a prompt in the model's context."""
    from nnxprune.generate import check_options, check_prompt

    check_prompt(args.prompt)
    config = context_of(args.model)
    check_options(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, flag=_flag,
                  context=config.max_position_embeddings if config is not None else None)


def check_importance(args, calibration, data_dir) -> None:
    """`nnxprune importance`: an output to write, a positive batch size, calibration windows
    that fit the model's context and calibration data that can be read."""
    if not args.json and not args.png:
        raise UserError("nothing would be written: give --json OUT and/or --png OUT (the scores "
                        "are computed only to be written there)")
    _positive("--batch-size", args.batch_size)
    within_context("calibration.seqlen", calibration.seqlen, context_of(args.model))
    check_calibration(calibration.dataset, data_dir)


def check_lm_eval(args, tasks: Sequence[str]):
    """`nnxprune lm-eval`: --limit, --num-fewshot, --batch-size and --max-length in range
    (--max-length within the model's context), then every task built with its data (see
    `lmeval.load_tasks`); returns what `lmeval.run_tasks(prepared=...)` takes."""
    limit = args.limit
    if limit is not None and not (0 < limit < 1 or (limit >= 1 and math.isfinite(limit)
                                                   and limit == int(limit))):
        raise UserError(f"--limit must be a whole number of documents >= 1 or a fraction in "
                        f"(0, 1), got {limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    _positive("--batch-size", args.batch_size)
    if args.max_length is not None:
        if args.max_length < 2:
            raise UserError(f"--max-length must be >= 2 tokens, got {args.max_length}")
        within_context("--max-length", args.max_length, context_of(args.model))
    from nnxprune.evaluate.lmeval.tasks import load_tasks

    return load_tasks(tasks, args.include_path)


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{flag} must be an integer >= 1, got {value}")


# -- data ------------------------------------------------------------------------------------------
def check_calibration(dataset, data_dir) -> None:
    """UserError when calibration documents could not be read: an unknown name or a missing file
    (`sources.resolve_dataset`), a local file that is not UTF-8 text, JSONL with `text` fields or
    parquet with a `text` column, the data folder's C4 slice missing or damaged, or the hub out of
    reach for what only it serves (c4 without a data folder, wikitext2). Tokenizes nothing."""
    from nnxprune.data import sources

    kind = sources.resolve_dataset(dataset)
    folder = sources.resolve_data_dir(data_dir)
    local = f"pass a local {'/'.join(sources.FILE_SUFFIXES)} file (--set calibration.dataset=PATH)"
    if kind.kind == "c4" and folder is not None:
        _parquet_text(sources._local_path("c4", "validation", folder))
    elif kind.kind == "c4":
        sources._require_hub("the C4 calibration shard", f"pass --data-dir or set "
                             f"{sources.DATA_DIR_ENV} to a folder with "
                             f"{sources.DATA_FILES[('c4', 'validation')]}, or {local}")
    elif kind.kind == "wikitext2":
        sources._require_hub("wikitext2/train", local)
    elif kind.path.suffix.lower() == ".parquet":
        _parquet_text(kind.path)
    else:
        sources.file_documents(kind.path)  # UTF-8, and JSONL objects with a string 'text'


def _parquet_text(path: Path) -> None:
    """UserError unless `path` is a parquet file with a `text` column (reads its footer only)."""
    import pyarrow.parquet as pq

    from nnxprune.data.sources import _one_line

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise UserError(f"cannot read {path} as parquet ({_one_line(e)[:200]})") from None
    if "text" not in names:
        raise UserError(f"{path} has no column 'text' (columns: {', '.join(names[:10])})")


def inspect_source(args):
    """`nnxprune inspect`'s unpruned config for the ratios: `--source` MODEL's (read without
    its weights when possible), else the one a checkpoint records, checked (a damaged
    `provenance.source_config` is a UserError naming nnxprune.json); None without either."""
    from nnxprune.io.checkpoint import META_FILE, is_checkpoint, read_meta
    from nnxprune.io.hf_config import config_from_hf, validate_config
    from nnxprune.models.llama import LlamaConfig

    if args.source:
        config = context_of(args.source)
        if config is None:  # a hub card not downloaded: its weights come with its config
            from nnxprune.io.load import load_model

            config = load_model(args.source, with_tokenizer=False).model.config
        return config
    if not is_checkpoint(Path(args.model)):
        return None
    recorded = read_meta(args.model).get("provenance", {}).get("source_config")
    if recorded is None:
        return None
    try:
        if not isinstance(recorded, dict):
            raise TypeError(f"expected an object, got {type(recorded).__name__}")
        return validate_config(LlamaConfig.from_dict(recorded) if "layers" in recorded
                               else config_from_hf(recorded))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{Path(args.model) / META_FILE}: provenance.source_config is damaged "
                        f"({type(e).__name__}: {e})") from None
