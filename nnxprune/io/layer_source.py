"""The lazy layer source's interface (DESIGN.md, principle 12): `LayerSource`.

A layer source keeps a model's weights in their files and hands out its config, single HF-named
tensors (the embedding, the final norm, the head) and decoder layer `i` materialized as the
project's `DecoderLayer` in the run dtype. The sources themselves: `nnxprune.io.layers`
(safetensors, GGUF, a depth cut's kept layers) and `nnxprune.io.orbax_layers` (nnxprune's own
checkpoints); `nnxprune.io.layers.open_layers` picks one for a model.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.models.llama import DecoderLayer, LlamaConfig

GLOBAL_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


class LayerSource:
    """Weights that stay in their files until asked for. Subclasses give `config`, `path`,
    `kind`, `dtype` (the checkpoint's weight dtype name) and `_read(keys)`."""

    config: LlamaConfig
    path: Path
    kind: str
    dtype: str
    biases: tuple[bool, bool] = (False, False)  # HF's (attention_bias, mlp_bias) of the output

    def keys(self) -> list[str]:
        raise NotImplementedError

    def _read(self, keys: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def tensor(self, key: str) -> np.ndarray:
        """One tensor under its HF name and layout (`[out, in]` projections), as stored."""
        if key not in self.keys():
            raise UserError(f"{self.path}: no tensor {key!r}")
        return self._read([key])[key]

    def bias_flags_of(self, layers) -> tuple[bool, bool]:
        """HF's `(attention_bias, mlp_bias)` of a model made of this source's `layers` (indices):
        the source's own flags unless a subclass knows each layer's."""
        return self.biases

    def global_keys(self) -> list[str]:
        """The embedding, final norm and (untied) head keys this checkpoint holds."""
        return [k for k in GLOBAL_KEYS if k in self.keys()]

    def layer(self, i: int, param_dtype=jnp.float32) -> DecoderLayer:
        """Decoder layer `i` as a `DecoderLayer` with `param_dtype` parameters, read from its
        own tensors only (every one must be there, with the shape the config implies; with
        `biases`, the bias of every projection they cover too, as `load_hf_folder` places them)."""
        from nnxprune.io.hf import hf_key_to_path
        from nnxprune.models.llama import projections

        shape = self.config.layers[i]

        def build():
            layer = DecoderLayer(self.config, shape, param_dtype=param_dtype, rngs=nnx.Rngs(0))
            for lin in projections(layer, attention=self.biases[0], mlp=self.biases[1]):
                lin.set_bias(jnp.zeros((lin.out_features,), param_dtype))
            return layer

        abstract = nnx.eval_shape(build)
        graphdef, state = nnx.split(abstract)
        wanted = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
        prefix = f"model.layers.{i}."
        keys = [k for k in self.keys() if k.startswith(prefix) and not _IGNORED.fullmatch(k)]
        values = {}
        for key, array in self._read(keys).items():
            found = hf_key_to_path(key)
            path = found[0][len(f"layers.{i}."):] if found else None
            if path not in wanted:
                raise UserError(f"{self.path}: tensor {key!r} has no place in a Llama layer")
            array = array.T if found[1] else array
            if array.shape != tuple(wanted[path].shape):
                raise UserError(f"{self.path}: tensor {key!r} has shape {array.shape}, the config "
                                f"implies {tuple(wanted[path].shape)}")
            values[path] = jnp.asarray(array, dtype=wanted[path].dtype)
        missing = sorted(set(wanted) - set(values))
        if missing:
            raise UserError(f"{self.path}: layer {i} misses {len(missing)} tensors, e.g. "
                            f"{prefix}{missing[0]!r}")
        return nnx.merge(graphdef, nnx.map_state(lambda p, v: values[".".join(map(str, p))], state))
