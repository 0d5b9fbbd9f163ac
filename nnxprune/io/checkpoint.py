"""nnxprune checkpoints: Orbax state plus a JSON config with per-layer shapes and provenance.

Layout of a checkpoint folder:

    nnxprune.json    {"format": "nnxprune-checkpoint", "config": {... per-layer shapes ...},
                      "masked": [paths of modules holding a Mask], "provenance": {...}}
    state/           Orbax `StandardCheckpointer` output of `nnx.state(model)`
    tokenizer files  (when a tokenizer was given)

It loads without knowing the shapes in advance: the JSON config builds the abstract target
(`nnx.eval_shape`), masks are attached where the JSON lists them, then Orbax restores into it.
Writes are atomic: everything goes to a temporary folder that is renamed into place.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.io.atomic import atomic_dir
from nnxprune.layers import Embed, Linear, RMSNorm
from nnxprune.models.llama import Llama, LlamaConfig

FORMAT = "nnxprune-checkpoint"
META_FILE = "nnxprune.json"


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def _masked_paths(model: Llama) -> list[str]:
    return [".".join(map(str, path)) for path, node in nnx.iter_graph(model)
            if isinstance(node, (Linear, Embed, RMSNorm)) and node.mask is not None]


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


def save_checkpoint(model: Llama, out_dir: str | os.PathLike, *, tokenizer=None,
                    provenance: dict[str, Any] | None = None) -> Path:
    """Saves `model` (masks included) to `out_dir` atomically."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir) as tmp:
        meta = {
            "format": FORMAT,
            "config": model.config.to_dict(),
            "param_dtype": str(model.embed_tokens.embedding.dtype),
            "masked": _masked_paths(model),
            "provenance": {
                "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": library_versions(),
                **(provenance or {}),
            },
        }
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "state", nnx.state(model))
            ckptr.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not is_checkpoint(path):
        raise UserError(f"{path}: not an nnxprune checkpoint (no {META_FILE})")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / META_FILE}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path / META_FILE}: unknown format {meta.get('format')!r}")
    return meta


def load_checkpoint(path: str | os.PathLike) -> Llama:
    """Restores a model saved by `save_checkpoint`, shapes and masks from its JSON config."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_meta(path)
    try:
        cfg = LlamaConfig.from_dict(meta["config"])
        dtype = jnp.dtype(meta.get("param_dtype", "float32"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path / META_FILE}: bad config ({type(e).__name__}: {e})") from None
    if not (path / "state").is_dir():
        raise UserError(f"{path}: the checkpoint has no state/ folder (incomplete or damaged)")
    masked = set(meta.get("masked", []))

    def build():
        model = Llama(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))
        for p, node in nnx.iter_graph(model):
            if ".".join(map(str, p)) in masked:
                node.set_mask(jnp.ones(_mask_shape(node), jnp.bool_))
        return model

    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(path / "state", abstract_state)
    except (ValueError, KeyError, FileNotFoundError) as e:  # orbax: structure / shape mismatch, missing files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: the saved state does not match the shapes in {META_FILE} or is "
                        f"incomplete ({first[:300]})") from None
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
