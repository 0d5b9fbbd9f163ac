"""nnxprune's own checkpoints read one decoder layer at a time (DESIGN.md, principle 12).

`OrbaxSource` is the lazy layer source (`nnxprune.io.layer_source.LayerSource`) of a checkpoint
folder written by `nnxprune.io.checkpoint.save_checkpoint` (what `prune` writes without
`--stream`, and `train`). Nothing is restored when it opens: `nnxprune.json` gives the config
(per-layer shapes after width surgery), the weights' dtype and the paths holding a `Mask` or a
bias, and Orbax's metadata (`PyTreeCheckpointer.metadata`) the saved tree's structure, shapes and
dtypes (the file checksums recorded at save time are checked, as for a whole load). Each read is
an Orbax *partial restore* (`ocp.args.PyTreeRestore(item, restore_args, partial_restore=True)` in
orbax-checkpoint 0.12): the target tree holds only the wanted leaf, and TensorStore reads only its
chunks from the OCDBT store, so restoring layer `i` reads layer `i`'s arrays and nothing else.
Leaves are restored one at a time (NumPy as stored, then the run dtype), so the transient memory
is about one array's: on a random checkpoint of 0.705 GB (8 layers, hidden 1024, MLP 4096, masks
on every projection), restoring one layer (0.084 GB) raised the peak RSS by 0.127 GB over opening
the source, the whole checkpoint by 1.03 GB (`benchmarks/orbax_layer_memory.py`; restoring a
layer's leaves in one call instead peaked at 1.6x their bytes, one by one at 1.15x).

- `layer(i, dtype)` restores decoder layer `i`'s kernels, masks, norm scales and optional biases
  (FLAP's) into its `DecoderLayer` in the run dtype, shaped as the layer's own entry of
  the config (Minitron / LLM-Pruner outputs have per-layer widths). Its masks stay attached, as in
  the in-memory model, so a method pruning it ANDs into them exactly as in memory; the evaluator
  folds them (`evaluate.layerwise.folded`), the HF writer writes them folded.
- `tensor(key)` / `_read(keys)` give HF-named tensors in HF layout as stored, masks folded into
  the kernels (`np.where(mask, kernel, 0)`, what `Linear.effective_kernel` computes): the
  embedding, final norm and head, and the layer tensors a depth cut copies. Bias keys follow HF's
  `attention_bias` / `mlp_bias` switches (`biases`), zeros where a projection has none, as
  `export_hf` writes them.

Channel masks on the embedding or a norm (a `width` step with `soft = true`) cannot be folded into
HF tensors (a masked RMSNorm averages over the kept channels only): such a checkpoint is refused
in one line.

Example:
    >>> source = OrbaxSource("out/wanda-ckpt")
    >>> layer = source.layer(3, jnp.bfloat16)   # layer 3's arrays restored, in bf16, masks attached
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.io.checkpoint import attach_saved, checkpoint_layout, restore_error
from nnxprune.io.hf import hf_key_to_path
from nnxprune.io.layer_source import LayerSource
from nnxprune.models.llama import ATTENTION_PROJ, MLP_PROJ, DecoderLayer

_GLOBALS = {"model.embed_tokens.weight": "embed_tokens.embedding", "model.norm.weight": "norm.scale",
            "lm_head.weight": "lm_head.kernel"}
_LINEAR = re.compile(r"(layers\.\d+\.(self_attn|mlp)\.\w+_proj|lm_head)")


def _flat_metadata(tree) -> dict[str, tuple[tuple[str, ...], object]]:
    """`{dotted module path: (key path in the saved tree, ArrayMetadata)}`; the trailing `value`
    key of an NNX Variable's saved form is dropped from the dotted path."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
        out[".".join(keys[:-1] if keys[-1] == "value" else keys)] = (keys, leaf)
    return out


class OrbaxSource(LayerSource):
    """An nnxprune checkpoint folder, restored one layer (or one tensor) at a time (module
    docstring). `dtype` is the checkpoint's weight dtype; `biases` HF's `(attention_bias,
    mlp_bias)` for it."""

    kind = "checkpoint"

    def __init__(self, path: str | Path):
        import orbax.checkpoint as ocp

        layout = checkpoint_layout(path)
        self.path, self.config = layout.path, layout.config
        self.dtype = np.dtype(layout.dtype).name
        self._masked, self._biased = layout.masked, layout.biased
        channel = sorted(m for m in self._masked if not _LINEAR.fullmatch(m))
        if channel:
            raise UserError(f"{self.path}: {channel[0]} holds a channel mask (a width step with soft "
                            f"= true); layer-by-layer reading folds masks into HF tensors, which "
                            f"cannot express it: drop --stream, or make the width edit hard")
        self.biases = self.bias_flags_of(range(self.config.num_layers))
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                tree = ckptr.metadata(self.path / "state").item_metadata.tree
        except Exception as e:  # noqa: BLE001 - orbax: missing or damaged metadata files
            raise restore_error(self.path, e) from None
        self._meta = _flat_metadata(tree)
        saved = {int(p.split(".")[1]) for p in self._meta if p.startswith("layers.")}
        if saved != set(range(self.config.num_layers)):
            raise UserError(f"{self.path}: the saved state has {len(saved)} decoder layers, "
                            f"nnxprune.json {self.config.num_layers} (damaged or edited)")
        self._keys = [k for k in _GLOBALS if _GLOBALS[k] in self._meta]
        for i in range(self.config.num_layers):
            self._keys += self._layer_keys(i)

    def bias_flags_of(self, layers) -> tuple[bool, bool]:
        """`(attention_bias, mlp_bias)`: whether any of `layers` has a bias of that kind."""
        return tuple(any(f"layers.{i}.{part}.{name}" in self._biased for i in layers
                         for name in names)
                     for part, names in (("self_attn", ATTENTION_PROJ), ("mlp", MLP_PROJ)))

    def _layer_keys(self, i: int) -> list[str]:
        prefix = f"model.layers.{i}."
        keys = [f"{prefix}self_attn.{n}.weight" for n in ATTENTION_PROJ]
        keys += [f"{prefix}mlp.{n}.weight" for n in MLP_PROJ]
        for part, names, on in (("self_attn", ATTENTION_PROJ, self.biases[0]),
                                ("mlp", MLP_PROJ, self.biases[1])):
            keys += [f"{prefix}{part}.{n}.bias" for n in names] if on else []
        return keys + [f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight"]

    def keys(self) -> list[str]:
        return list(self._keys)

    def _restore(self, wanted: dict[str, object]) -> dict[str, object]:
        """`{dotted path: array}` for `wanted = {dotted path: dtype, or None for the stored one}`:
        a partial restore of each leaf in turn (NumPy as stored, then a `jax.Array` in `dtype`
        when one is given), so the transient memory is one array's, not the set's."""
        import orbax.checkpoint as ocp

        for path in wanted:
            if path not in self._meta:
                raise UserError(f"{self.path}: the saved state has no {path} (it does not match "
                                f"nnxprune.json, or is damaged)")
        out = {}
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                for path, dtype in wanted.items():
                    keys, meta = self._meta[path]
                    item = args = None
                    for key in reversed(keys):  # the saved tree's branch to this leaf alone
                        item = {key: item if item is not None else
                                jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype)}
                        args = {key: args if args is not None else
                                ocp.RestoreArgs(restore_type=np.ndarray)}
                    value = ckptr.restore(self.path / "state", args=ocp.args.PyTreeRestore(
                        item=item, restore_args=args, partial_restore=True))
                    for key in keys:
                        value = value[key]
                    if not isinstance(value, np.ndarray) or value.shape != tuple(meta.shape):
                        raise UserError(f"{self.path}: {path} could not be restored from the saved "
                                        f"state")
                    out[path] = value if dtype is None else jnp.asarray(value, dtype)
                    del value
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore: mismatch or bad files
            raise restore_error(self.path, e) from None
        return out

    def layer(self, i: int, param_dtype=np.float32) -> DecoderLayer:
        """Decoder layer `i` in `param_dtype` (masks bool), its arrays alone restored, shaped as
        `config.layers[i]`; the saved leaves under `layers.i` must be exactly the layer's."""
        if not 0 <= i < self.config.num_layers:
            raise IndexError(f"layer {i} of a model with {self.config.num_layers} layers")
        prefix = f"layers.{i}."
        abstract = nnx.eval_shape(lambda: attach_saved(DecoderLayer(
            self.config, self.config.layers[i], param_dtype=param_dtype, rngs=nnx.Rngs(0)),
            self._masked, self._biased, prefix))
        graphdef, state = nnx.split(abstract)
        wanted = {prefix + ".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
        saved = {p for p in self._meta if p.startswith(prefix)}
        extra, missing = sorted(saved - set(wanted)), sorted(set(wanted) - saved)
        if extra or missing:
            what = f"holds {extra[0]}" if extra else f"has no {missing[0]}"
            raise UserError(f"{self.path}: the saved state {what}, which nnxprune.json does not "
                            f"describe (damaged or edited)")
        for path, var in wanted.items():
            if tuple(self._meta[path][1].shape) != tuple(var.shape):
                raise UserError(f"{self.path}: {path} is saved with shape "
                                f"{tuple(self._meta[path][1].shape)}; nnxprune.json implies "
                                f"{tuple(var.shape)}")
        values = self._restore({p: v.dtype for p, v in wanted.items()})
        return nnx.merge(graphdef, nnx.map_state(
            lambda p, v: values[prefix + ".".join(map(str, p))], state))

    def _read(self, keys: list[str]) -> dict[str, np.ndarray]:
        """HF-named tensors in HF layout as stored, masks folded into the kernels; a bias key of
        a projection without a bias gives zeros (module docstring)."""
        plan = {}
        for key in keys:
            found = (_GLOBALS[key], key == "lm_head.weight") if key in _GLOBALS else hf_key_to_path(key)
            if found is None or key not in self._keys:
                raise UserError(f"{self.path}: no tensor {key!r}")
            plan[key] = found
        paths = {p for p, _ in plan.values() if p in self._meta}
        paths |= {p.rsplit(".", 1)[0] + ".mask" for p in paths if p.rsplit(".", 1)[0] in self._masked}
        stored = self._restore(dict.fromkeys(sorted(paths)))
        out = {}
        for key, (path, transposed) in plan.items():
            module, leaf = path.rsplit(".", 1)
            if path not in stored:  # a bias the projection does not have: zeros, as export_hf
                kernel = self._meta[module + ".kernel"][1]
                out[key] = np.zeros((kernel.shape[1],), kernel.dtype)
                continue
            array, mask = stored[path], stored.get(module + ".mask")
            if mask is not None:  # Linear.effective_kernel / effective_bias
                keep = mask if leaf == "kernel" else mask.any(axis=0)
                array = np.where(keep, array, np.zeros((), array.dtype))
            out[key] = np.ascontiguousarray(array.T) if transposed else array
        return out
