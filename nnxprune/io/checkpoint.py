"""nnxprune checkpoints: Orbax state plus a JSON config with per-layer shapes and provenance.

Layout of a checkpoint folder:

    nnxprune.json    {"format": "nnxprune-checkpoint", "config": {... per-layer shapes ...},
                      "masked": [paths of modules holding a Mask], "provenance": {...},
                      "source_layers": [the source-model index of every layer, after drops],
                      "biased": [paths of Linears holding a bias] (only when some do)}
    state/           Orbax `StandardCheckpointer` output of `nnx.state(model)`
    tokenizer files  (when a tokenizer was given)

It loads without knowing the shapes in advance: the JSON config builds the abstract target
(`nnx.eval_shape`), masks are attached where the JSON lists them, then Orbax restores into it.
Writes are atomic: everything goes to a temporary folder that is renamed into place.
`checkpoint_layout` reads and validates the JSON alone; `io.orbax_layers` uses it (and
`attach_saved`) to restore one decoder layer at a time without the rest (`--stream`).

Damage is diagnosed, not crashed on: `nnxprune.json` records the size and CRC32 of every file
under `state/` (`"files"`), checked before restoring, so a truncated, emptied or bit-flipped data
file is named with what was expected; an edited config (wrong head counts, a list where a number
belongs) is named by field (`hf_config.validate_config`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.io.atomic import atomic_dir
from nnxprune.io.hf_config import validate_config
from nnxprune.layers import Embed, Linear, RMSNorm
from nnxprune.models.llama import Llama, LlamaConfig

FORMAT = "nnxprune-checkpoint"
META_FILE = "nnxprune.json"


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def _masked_paths(model: Llama) -> list[str]:
    return [".".join(map(str, path)) for path, node in nnx.iter_graph(model)
            if isinstance(node, (Linear, Embed, RMSNorm)) and node.mask is not None]


def _biased_paths(model: Llama) -> list[str]:
    return [".".join(map(str, path)) for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear) and node.bias is not None]


def _mask_shape(node) -> tuple[int, ...]:
    if isinstance(node, Linear):
        return node.kernel.shape
    if isinstance(node, Embed):
        return node.embedding.shape[1:]
    return node.scale.shape


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("nnxprune", "jax", "flax", "orbax-checkpoint", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _file_digest(path: Path) -> str:
    """CRC32 of a file: catches truncation and bit flips at 2.3x sha256's speed (1188 against 505
    MiB/s, one core of the project's AMD EPYC, 256 MiB, median of 3), which matters for
    multi-GB checkpoints."""
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


def state_files(folder: Path) -> dict[str, list]:
    """`{path relative to folder: [size, "crc32:..."]}` of every file under `folder/state`."""
    return {str(p.relative_to(folder)): [p.stat().st_size, _file_digest(p)]
            for p in sorted((folder / "state").rglob("*")) if p.is_file()}


def verify_state(path: Path, files: dict[str, Any]) -> None:
    """UserError naming the first file under state/ that is missing, of another size or
    another content than `save_checkpoint` recorded."""
    for rel, entry in files.items():
        file = path / rel
        try:
            size, digest = entry
        except (TypeError, ValueError):
            raise UserError(f"{path / META_FILE}: damaged 'files' entry for {rel}") from None
        if not file.is_file():
            raise UserError(f"{file} is missing (the checkpoint is incomplete)")
        actual = file.stat().st_size
        if actual != size:
            how = "truncated" if actual < size else "longer than written"
            raise UserError(f"{file} is damaged: {how} ({actual} bytes, {size} expected)")
        if _file_digest(file) != digest:
            raise UserError(f"{file} is damaged: its checksum differs from the one recorded at "
                            f"save time ({size} bytes, content changed)")


def save_checkpoint(model: Llama, out_dir: str | os.PathLike, *, tokenizer=None,
                    provenance: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Saves `model` (masks included) to `out_dir` atomically.

    An existing `out_dir` is replaced only if nnxprune wrote it or `overwrite` (`io.atomic`)."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        meta = {
            "format": FORMAT,
            "config": model.config.to_dict(),
            "param_dtype": str(model.embed_tokens.embedding.dtype),
            "masked": _masked_paths(model),
            # the source-model index of every layer, after layers were dropped (recovery.pairs)
            "source_layers": list(getattr(model, "source_layers", None)
                                  or range(len(model.layers))),
            "provenance": {
                "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": library_versions(),
                **(provenance or {}),
            },
        }
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "state", nnx.state(model))
            ckptr.wait_until_finished()
        if _biased_paths(model):  # optional biases (FLAP): zeros attached there before restoring
            meta["biased"] = _biased_paths(model)
        meta["files"] = state_files(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not is_checkpoint(path):
        raise UserError(f"{path}: not an nnxprune checkpoint (no {META_FILE})")
    where = path / META_FILE
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start}); a checkpoint's metadata is JSON") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{where}: cannot be read ({e.strerror or e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise UserError(f"{where}: unknown format {meta.get('format')!r}")
    for key in ("provenance", "files"):
        if key in meta and not isinstance(meta[key], dict):
            raise UserError(f"{where}: {key!r} must be an object, got {type(meta[key]).__name__}")
    return meta


def _config(path: Path, meta: dict[str, Any]):
    """The validated config and dtype of a checkpoint's `nnxprune.json`."""
    where = path / META_FILE
    try:
        raw = meta["config"]
        if not isinstance(raw, dict) or not isinstance(raw.get("layers"), list):
            raise ValueError("'config' must be an object with a 'layers' list")
        for i, layer in enumerate(raw["layers"]):
            if not isinstance(layer, dict):
                raise ValueError(f"layers[{i}] must be an object, got {layer!r}")
        cfg = validate_config(LlamaConfig.from_dict(raw))
        dtype = jnp.dtype(meta.get("param_dtype", "float32"))
    except KeyError as e:
        raise UserError(f"{where}: bad config (missing key {e})") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: bad config ({e})") from None
    masked = meta.get("masked", [])
    if not isinstance(masked, list) or not all(isinstance(m, str) for m in masked):
        raise UserError(f"{where}: 'masked' must be a list of module paths")
    return cfg, dtype, set(masked)


def checkpoint_config(path: str | os.PathLike) -> LlamaConfig:
    """The validated config of a checkpoint, without restoring any weight."""
    path = Path(path).absolute()
    return _config(path, read_meta(path))[0]


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """What a checkpoint's `nnxprune.json` says about its state, validated, no weight read: the
    config (per-layer shapes), the weights' dtype, the module paths holding a `Mask` and a bias,
    and `source_layers` as recorded (None when not; `load_checkpoint` checks it)."""

    path: Path
    config: LlamaConfig
    dtype: Any
    masked: frozenset
    biased: frozenset
    source_layers: Any


def checkpoint_layout(path: str | os.PathLike, *, verify: bool = True) -> CheckpointLayout:
    """The validated layout of the checkpoint at `path`; with `verify`, every file under state/
    checked against the sizes and checksums recorded at save time (`verify_state`). Both
    `load_checkpoint` and the lazy reader (`io.orbax_layers`) start here."""
    path = Path(path).absolute()
    meta = read_meta(path)
    cfg, dtype, masked = _config(path, meta)
    biased = meta.get("biased", [])
    if not isinstance(biased, list) or not all(isinstance(b, str) for b in biased):
        raise UserError(f"{path / META_FILE}: 'biased' must be a list of module paths")
    if not (path / "state").is_dir():
        raise UserError(f"{path}: the checkpoint has no state/ folder (incomplete or damaged)")
    if verify and isinstance(meta.get("files"), dict):  # older checkpoints: Orbax alone
        verify_state(path, meta["files"])
    return CheckpointLayout(path, cfg, dtype, frozenset(masked), frozenset(biased),
                            meta.get("source_layers"))


def restore_error(path: Path, e: Exception) -> UserError:
    """The one-line error of a failed Orbax restore (a mismatch with nnxprune.json, missing or
    damaged files)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"{path}: the saved state does not match the shapes in {META_FILE} or is "
                     f"damaged ({type(e).__name__}: {first[:300]})")


def attach_saved(module, masked, biased, prefix: str = ""):
    """`module` (the model, or decoder layer `i` with `prefix` "layers.i.") with a placeholder
    `Mask` on every path in `masked` and a zero bias on every Linear in `biased`: the structure
    the saved state restores into. In place; returns `module`."""
    for p, node in nnx.iter_graph(module):
        name = prefix + ".".join(map(str, p))
        if name in masked:
            node.set_mask(jnp.ones(_mask_shape(node), jnp.bool_))
        if isinstance(node, Linear) and name in biased:
            node.set_bias(jnp.zeros((node.out_features,), node.kernel.dtype))
    return module


def load_checkpoint(path: str | os.PathLike, param_dtype=None) -> Llama:
    """Restores a model saved by `save_checkpoint`, shapes and masks from its JSON config.

    `param_dtype` (e.g. `jnp.float32`): the dtype of every floating-point array after loading
    (weights and biases; masks stay boolean), as the other formats' loaders take it; None keeps
    the dtype the checkpoint was saved in."""
    import orbax.checkpoint as ocp

    layout = checkpoint_layout(path)
    path, cfg = layout.path, layout.config
    abstract = nnx.eval_shape(lambda: attach_saved(
        Llama(cfg, param_dtype=layout.dtype, rngs=nnx.Rngs(0)), layout.masked, layout.biased))
    graphdef, abstract_state = nnx.split(abstract)
    # onto this process's first device, whatever layout saved it (a multi-process save records its
    # mesh; without a target sharding Orbax refuses another topology)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), abstract_state)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(path / "state", abstract_state)
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore: mismatch, missing or bad files
        raise restore_error(path, e) from None
    if param_dtype is not None:
        dtype = jnp.dtype(param_dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"load_checkpoint: param_dtype must be a floating dtype, got {dtype}")
        state = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
    layers = layout.source_layers  # checkpoints before it was recorded: none dropped known
    if layers is not None:
        if (not isinstance(layers, list) or len(layers) != cfg.num_layers
                or not all(isinstance(i, int) and i >= 0 for i in layers)):
            raise UserError(f"{path / META_FILE}: 'source_layers' must list one source index per "
                            f"layer ({cfg.num_layers})")
        model.source_layers = tuple(layers)
    return model
