"""Lazy layer sources and the layer-by-layer writer (DESIGN.md, principle 12).

A model larger than memory is never built whole. A `LayerSource` (`io.layer_source`) keeps the
weights in their files (safetensors read tensor by tensor, sharded or not; a GGUF file
memory-mapped and dequantized one tensor at a time; an nnxprune checkpoint restored by Orbax one
layer at a time, `io.orbax_layers`) and hands out the config, single HF-named tensors (the embedding, the final
norm, the head) and decoder layer `i` materialized as the project's `DecoderLayer` in the run
dtype, built from that layer's tensors alone. `HFLayerWriter` writes an HF folder the same way:
one safetensors shard per decoder layer as soon as it is finished, one for the embedding, norm
and head, then `model.safetensors.index.json` and `config.json`, in the dtype asked for (the
input's own, usually), masks folded into the kernels. Use it inside `atomic_dir`, so the folder
appears whole or not at all. `KeptLayers` sees some layers of a source as a model of their own,
renumbered (a depth cut), and `HFLayerWriter.copy_layer` writes a layer's tensors as stored,
without building it.

Example:
    >>> source = open_layers("smollm2-135m")
    >>> layer = source.layer(3, jnp.float32)            # a DecoderLayer, nothing else loaded
    >>> with atomic_dir(out) as tmp:
    ...     writer = HFLayerWriter(tmp, source.config, dtype="bfloat16")
    ...     writer.write_layer(3, layer)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from nnxprune.errors import UserError
from nnxprune.io.layer_source import _IGNORED, GLOBAL_KEYS, LayerSource
from nnxprune.models.llama import LlamaConfig

__all__ = ["GLOBAL_KEYS", "GGUFSource", "HFLayerWriter", "KeptLayers", "LayerSource",
           "SafetensorsSource", "open_layers"]

class SafetensorsSource(LayerSource):
    """An HF folder (config.json + safetensors, sharded or not), read tensor by tensor; with
    `attention_bias` / `mlp_bias` set, a bias for every projection they cover (`biases`)."""

    kind = "hf"

    def __init__(self, folder: str | Path):
        from nnxprune.io.hf import _safetensors_files, read_hf_config
        from nnxprune.io.hf_config import hf_bias_flags
        from safetensors import safe_open

        self.path = Path(folder)
        self.config = read_hf_config(self.path / "config.json", allow_bias=True)
        # HF's attention_bias / mlp_bias (a FLAP export): every covered projection's bias is read
        self.biases = hf_bias_flags(json.loads((self.path / "config.json").read_text(encoding="utf-8")))
        self._file: dict[str, Path] = {}
        sizes: dict[str, int] = {}
        for file in _safetensors_files(self.path):
            try:
                with safe_open(str(file), framework="numpy") as f:
                    for key in f.keys():
                        self._file[key] = file
                        s = f.get_slice(key)
                        name = _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype().lower())
                        sizes[name] = sizes.get(name, 0) + int(np.prod(s.get_shape()))
            except FileNotFoundError:
                raise UserError(f"missing checkpoint shard {file}") from None
            except Exception as e:  # noqa: BLE001 - safetensors' own error types: a damaged file
                raise UserError(f"{file} is damaged or truncated (safetensors: {str(e)[:200]})") from None
        self.dtype = max(sizes, key=sizes.get) if sizes else "float32"

    def keys(self) -> list[str]:
        return list(self._file)

    def _read(self, keys: list[str]) -> dict[str, np.ndarray]:
        from safetensors import safe_open

        out = {}
        for file in sorted({self._file[k] for k in keys}):
            with safe_open(str(file), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in keys if self._file[k] == file})
        return out


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


class GGUFSource(LayerSource):
    """A Llama GGUF file, memory-mapped; each tensor dequantized (to float32) when read. Its
    output dtype is float32, what the quantized weights dequantize to."""

    kind = "gguf"
    dtype = "float32"

    def __init__(self, path: str | Path):
        from nnxprune.io.gguf import open_gguf
        from nnxprune.io.load import _gguf_config

        self.path = Path(path)
        self._hf_config, self._table = open_gguf(self.path)
        self.config = _gguf_config(self.path)

    def keys(self) -> list[str]:
        return list(self._table)

    def _read(self, keys: list[str]) -> dict[str, np.ndarray]:
        from nnxprune.io.gguf import dequantize_tensor

        return {k: dequantize_tensor(self._table[k], self._hf_config) for k in keys}


class KeptLayers(LayerSource):
    """The layers `keep` of `source`, renumbered `0 .. len(keep) - 1` (a depth cut seen as a model
    of its own: its config has the kept layers' shapes, its keys the new numbers). Nothing is
    read until asked for; the globals are the source's."""

    def __init__(self, source: LayerSource, keep):
        import dataclasses

        self.source, self.keep = source, [int(i) for i in keep]
        self.config = dataclasses.replace(source.config, layers=tuple(
            source.config.layers[i] for i in self.keep))
        self.path, self.kind, self.dtype = source.path, source.kind, source.dtype
        self.biases = source.bias_flags_of(self.keep)  # the kept layers' (a dropped one's gone)
        self._old: dict[str, str] = {}
        new_index = {old: new for new, old in enumerate(self.keep)}
        for key in source.keys():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
            if key.endswith(".bias") and not self.biases[0 if ".self_attn." in key else 1]:
                continue
            if m is None:
                self._old[key] = key
            elif int(m.group(1)) in new_index:
                self._old[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = key

    def keys(self) -> list[str]:
        return list(self._old)

    def _read(self, keys: list[str]) -> dict[str, np.ndarray]:
        found = self.source._read([self._old[k] for k in keys])
        return {k: found[self._old[k]] for k in keys}

    def bias_flags_of(self, layers) -> tuple[bool, bool]:
        return self.source.bias_flags_of([self.keep[i] for i in layers])

    def layer(self, i: int, param_dtype=jnp.float32):
        """Kept layer `i` as the source builds its layer `keep[i]` (masks and biases of a
        checkpoint's layer included)."""
        return self.source.layer(self.keep[i], param_dtype)


def open_layers(name_or_path) -> LayerSource:
    """The lazy layer source of `MODEL` (an HF folder, a GGUF file, an nnxprune checkpoint, or a
    card naming one)."""
    from nnxprune.io.load import _resolve, model_kind
    from nnxprune.io.orbax_layers import OrbaxSource

    path, _ = _resolve(name_or_path)
    kind = model_kind(path)
    if kind == "hf":
        return SafetensorsSource(path)
    if kind == "gguf":
        return GGUFSource(path)
    if kind == "checkpoint":
        return OrbaxSource(path)
    raise UserError(f"{name_or_path}: layer-by-layer loading reads Hugging Face folders, GGUF "
                    f"files and nnxprune checkpoints; this is none of them")


class HFLayerWriter:
    """Writes an HF folder one shard at a time into `folder` (module docstring). Shards are
    `model-00001-of-NNNNN.safetensors`: one per decoder layer in order, the embedding, final
    norm and head last."""

    def __init__(self, folder: str | Path, config: LlamaConfig, *, dtype: str = "float32",
                 biases: tuple[bool, bool] = (False, False)):
        self.folder, self.config, self.dtype = Path(folder), config, dtype
        self.biases = tuple(bool(b) for b in biases)  # HF's (attention_bias, mlp_bias)
        self.shards = config.num_layers + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def _shard(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.shards:05d}.safetensors"

    def _save(self, index: int, tensors: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        name = self._shard(index)
        save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
        for key, array in tensors.items():
            self.weight_map[key] = name
            self.total_size += array.nbytes

    def state(self) -> dict[str, Any]:
        """What was written so far (the shard index), for a resumable run to `restore`."""
        return {"weight_map": dict(self.weight_map), "total_size": self.total_size}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues a writer whose shards in `folder` an earlier run wrote (`state()`)."""
        self.weight_map, self.total_size = dict(state["weight_map"]), int(state["total_size"])

    def write_layer(self, i: int, layer) -> None:
        """Decoder layer `i` (masks folded, cast to the writer's dtype) as its own shard; with
        `biases`, a bias for every projection they cover (zeros where the layer has none)."""
        from nnxprune.io.hf import layer_hf_tensors

        self._save(i, layer_hf_tensors(i, layer, jnp.dtype(self.dtype),
                                       biases=self.biases if any(self.biases) else None))

    def copy_layer(self, i: int, source: LayerSource) -> None:
        """Decoder layer `i` of `source` as its own shard, its tensors as stored (cast to the
        writer's dtype), nothing onloaded (a depth cut copies the kept layers so)."""
        prefix = f"model.layers.{i}."
        keys = [k for k in source.keys() if k.startswith(prefix) and not _IGNORED.fullmatch(k)]
        dtype = jnp.dtype(self.dtype)
        self._save(i, {k: np.ascontiguousarray(np.asarray(v).astype(dtype, copy=False))
                       for k, v in source._read(keys).items()})

    def write_globals(self, tensors: dict[str, np.ndarray]) -> None:
        """The embedding, final norm and head (HF names and layouts) as the last shard."""
        dtype = jnp.dtype(self.dtype)
        self._save(self.config.num_layers,
                   {k: np.ascontiguousarray(np.asarray(v).astype(dtype, copy=False))
                    for k, v in tensors.items()})

    def finish(self, tokenizer=None) -> None:
        """The shard index, config.json (the config with this dtype) and the tokenizer."""
        from nnxprune.io.hf_config import config_to_hf

        written = set(self.weight_map.values())
        if len(written) != self.shards:
            raise RuntimeError(f"{self.shards - len(written)} shards were never written")
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_config = config_to_hf(self.config, allow_heterogeneous=True, dtype=self.dtype,
                                 attention_bias=self.biases[0], mlp_bias=self.biases[1])
        (self.folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.folder))
