"""Hugging Face checkpoints in and out: a table of key patterns, no model materialised twice.

Loading follows Tunix's recipe: build the model abstractly with `nnx.eval_shape`, then fill
every variable from a table of regular expressions that map HF keys onto module paths with a
transform (projections are stored `[out, in]` by HF and `[in, out]` here). Every HF key must be
used and every variable filled, so a wrong or partial checkpoint is an error, not garbage.

Export writes `config.json` (derived from the model's shapes, with the dtype the tensors have) and
`model.safetensors` into a temporary folder beside the target and renames it into place, so no
partial output is left; every file gets the user's umask.

Heterogeneous models. When every decoder layer has the same shape the folder is a plain
`LlamaForCausalLM` one that transformers, vLLM and the rest load as usual. After structured
pruning layers usually differ (layer 3 keeps 6 query heads, layer 7 keeps 9, MLP widths differ),
and a plain Llama config cannot say so: it has one `num_attention_heads`, `num_key_value_heads` and
`intermediate_size` for all layers. Such models (and models with no layers left) are written in
nnxprune's own variant of the format:

- `model.safetensors` is unchanged: the same HF key names and `[out, in]` layouts, each tensor
  with its layer's own shape.
- `config.json` keeps every usual Llama field, with the three per-layer fields set to their maxima
  over layers (placeholders when there are no layers), and adds the truth per layer:
  `"nnxprune_layers": [{"num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1408}, ...]`,
  one entry per layer, in order. `num_hidden_layers` equals its length.
- `"model_type": "nnxprune_llama"` and `"architectures": ["NnxpruneLlamaForCausalLM"]`.

Why not a plain Llama config: a reader that ignores the per-layer list would build the wrong
model. transformers' `AutoModelForCausalLM` / `AutoConfig` / `pipeline` refuse the unknown model
type with a `ValueError` ("...has model type `nnxprune_llama` but Transformers does not recognize
this architecture..."), with or without `ignore_mismatched_sizes`, so nothing loads half right.
Forcing the class, `LlamaForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True)`, would
otherwise load: it re-initialises every tensor whose shape differs from the maxima at random and
returns a model that produces garbage. To stop that too, `config.json` also carries the per-layer
sizes as transformers' own `per_layer_config` overrides (its `HeterogeneousConfigMixin`); with
those, transformers >= 5 refuses to build a plain Llama from the config
(`AmbiguousGlobalPerLayerAttributeError`: "'num_attention_heads' is a per-layer attribute...").
Versions without that mixin ignore the key; there, forcing the class still warns about the model
type and fails on the size mismatch unless told to ignore it. nnxprune reads `nnxprune_layers` only.

Biases. Projections may carry optional biases (FLAP's compensation adds them to o_proj and
down_proj). HF's `LlamaForCausalLM` knows two switches: `attention_bias` puts a bias on q, k, v and
o, `mlp_bias` on gate, up and down. Export turns a switch on when any layer has any bias of its
kind and writes a bias for every projection it covers, zeros where the model has none, so
transformers loads the folder as it is; `load_hf_folder` reads the switches and places every bias
(the zero ones too: the model loaded back has them as parameters, with identical outputs).

`load_hf_folder` reads both variants back exactly; `nnxprune.io.hf_config.config_from_hf` validates
the per-layer list (length, positive integers, query heads a multiple of KV heads).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.io.atomic import atomic_dir
from nnxprune.io.hf_config import config_from_hf, config_to_hf, hf_bias_flags
from nnxprune.models.llama import Llama, LlamaConfig, add_biases, bias_flags, projections

# (HF key regex, nnxprune path template, "T" if the array is transposed between the two)
_KEY_TABLE: tuple[tuple[str, str, bool], ...] = (
    (r"model\.embed_tokens\.weight", "embed_tokens.embedding", False),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers.\1.self_attn.\2_proj.kernel", True),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.kernel", True),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.bias", r"layers.\1.self_attn.\2_proj.bias", False),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.bias", r"layers.\1.mlp.\2_proj.bias", False),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"layers.\1.\2.scale", False),
    (r"model\.norm\.weight", "norm.scale", False),
    (r"lm_head\.weight", "lm_head.kernel", True),
)
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # buffers some old exports carry


def hf_key_to_path(key: str) -> tuple[str, bool] | None:
    """`("layers.0.self_attn.q_proj.kernel", transposed)` for an HF key, or None if unknown."""
    for pattern, template, transposed in _KEY_TABLE:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template), transposed
    return None


def abstract_model(cfg: LlamaConfig, param_dtype=jnp.float32, *,
                   biases: tuple[bool, bool] = (False, False)) -> Llama:
    """The model's structure with `ShapeDtypeStruct`s in place of arrays (no memory used), with
    `biases = (attention_bias, mlp_bias)` as HF's config flags place them."""
    return nnx.eval_shape(lambda: add_biases(Llama(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                                             attention=biases[0], mlp=biases[1]))


def model_from_tensors(cfg: LlamaConfig, tensors: Iterable[tuple[str, Any]], *,
                       param_dtype=jnp.float32, source: str = "checkpoint",
                       biases: tuple[bool, bool] = (False, False)) -> Llama:
    """Builds a `Llama` from `(hf_key, array)` pairs, filling an abstract model in place.

    `tensors` may be a lazy iterator (one tensor dequantized or read at a time). `biases`:
    the config's `(attention_bias, mlp_bias)`; their bias tensors must then all be there.
    """
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype, biases=biases))
    wanted = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    values: dict[str, Any] = {}
    for key, array in tensors:
        if _IGNORED.fullmatch(key):
            continue
        found = hf_key_to_path(key)
        if found is None or found[0] not in wanted:
            raise UserError(f"{source}: tensor {key!r} has no place in a Llama with "
                            f"{cfg.num_layers} layers (tied embeddings: {cfg.tie_word_embeddings})")
        path, transposed = found
        array = np.asarray(array)
        if transposed:
            array = array.T
        expected = wanted[path].shape
        if array.shape != tuple(expected):
            raise UserError(f"{source}: tensor {key!r} has shape {array.shape[::-1] if transposed else array.shape}, "
                            f"the config implies {tuple(expected)[::-1] if transposed else tuple(expected)}")
        values[path] = jnp.asarray(array, dtype=wanted[path].dtype)
    missing = sorted(set(wanted) - set(values))
    if missing:
        raise UserError(f"{source}: missing {len(missing)} tensors, e.g. {missing[0]!r}")
    filled = nnx.map_state(lambda path, v: values[".".join(map(str, path))], state)
    return nnx.merge(graphdef, filled)


def layer_hf_tensors(i: int, layer, dtype=None, *, biases: tuple[bool, bool] | None = None
                     ) -> dict[str, np.ndarray]:
    """Decoder layer `i`'s weights under HF names and layouts (masks folded into kernels),
    cast to `dtype` when given (the layer-by-layer writer of `nnxprune.io.layers` uses it).
    `biases = (attention_bias, mlp_bias)` (default: whether this layer has any) writes every
    attention / MLP projection's bias, zeros where the projection has none, as HF expects."""
    out: dict[str, np.ndarray] = {}
    if biases is None:
        biases = tuple(any(lin.bias is not None for lin in projections(layer, attention=a, mlp=not a))
                       for a in (True, False))

    def put(key, array):
        out[key] = np.asarray(array if dtype is None else array.astype(dtype))

    for name in "qkvo":
        put(f"model.layers.{i}.self_attn.{name}_proj.weight",
            getattr(layer.self_attn, f"{name}_proj").effective_kernel().T)
    for name in ("gate", "up", "down"):
        put(f"model.layers.{i}.mlp.{name}_proj.weight",
            getattr(layer.mlp, f"{name}_proj").effective_kernel().T)
    for part, names, on in (("self_attn", "qkvo", biases[0]), ("mlp", ("gate", "up", "down"), biases[1])):
        for name in names if on else ():
            lin = getattr(getattr(layer, part), f"{name}_proj")
            bias = lin.effective_bias() if lin.bias is not None else jnp.zeros(
                (lin.out_features,), lin.kernel.dtype)
            put(f"model.layers.{i}.{part}.{name}_proj.bias", bias)
    put(f"model.layers.{i}.input_layernorm.weight", layer.input_layernorm.scale[...])
    put(f"model.layers.{i}.post_attention_layernorm.weight", layer.post_attention_layernorm.scale[...])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def to_hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The model's weights under HF names and layouts (masks folded into kernels)."""
    out: dict[str, np.ndarray] = {}
    out["model.embed_tokens.weight"] = np.asarray(model.embed_tokens.embedding[...])
    biases = bias_flags(model)
    for i, layer in enumerate(model.layers):
        out.update(layer_hf_tensors(i, layer, biases=biases))
    out["model.norm.weight"] = np.asarray(model.norm.scale[...])
    if model.lm_head is not None:
        out["lm_head.weight"] = np.asarray(model.lm_head.effective_kernel()).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# -- folders ---------------------------------------------------------------------------------
def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: damaged shard index ({type(e).__name__}: {e})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors files (only safetensors checkpoints are read)")
    return files


def iter_safetensors(files: Iterable[Path]) -> Iterable[tuple[str, np.ndarray]]:
    """Yields `(key, array)` one tensor at a time from safetensors files."""
    from safetensors import safe_open

    for file in files:
        if not file.is_file():
            raise UserError(f"missing checkpoint shard {file}")
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' own error types: a damaged file
            raise UserError(f"{file} is damaged or truncated (safetensors: {str(e)[:200]})") from None


def read_hf_config(config_file: Path, *, allow_bias: bool = False) -> LlamaConfig:
    """The validated `LlamaConfig` of a config.json (UserError naming the file and the key);
    `attention_bias` / `mlp_bias` are refused unless `allow_bias` (the reader places them)."""
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    try:
        return config_from_hf(raw, allow_bias=allow_bias)
    except KeyError as e:
        raise UserError(f"{config_file}: missing key {e}") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise UserError(f"{config_file}: {e}") from None


def load_hf_folder(folder: str | os.PathLike, *, param_dtype=jnp.float32) -> Llama:
    """Loads a Hugging Face Llama folder (config.json + safetensors, sharded or not).

    Reads plain Llama folders and nnxprune's heterogeneous `nnxprune_llama` ones.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    cfg = read_hf_config(config_file, allow_bias=True)
    biases = hf_bias_flags(json.loads(config_file.read_text(encoding="utf-8")))
    return model_from_tensors(cfg, iter_safetensors(_safetensors_files(folder)),
                              param_dtype=param_dtype, source=str(folder), biases=biases)


def export_hf(model: Llama, out_dir: str | os.PathLike, *, tokenizer=None,
              extra_files: Mapping[str, Callable[[Path], None]] | None = None,
              overwrite: bool = False) -> Path:
    """Writes an HF folder atomically (temporary folder, then rename).

    Masks are folded into the kernels; the config is read from the model's shapes. Uniform layers
    give a plain `LlamaForCausalLM` folder; layers of different shapes (or none) give nnxprune's
    `nnxprune_llama` variant, which `load_hf_folder` reads and transformers refuses (module
    docstring). An existing `out_dir` is replaced only if nnxprune wrote it (unchanged) or
    `overwrite` (`nnxprune.io.atomic`).
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    tensors = to_hf_tensors(model)
    attention_bias, mlp_bias = bias_flags(model)
    hf_config = config_to_hf(model.config, allow_heterogeneous=True, dtype=weights_dtype(tensors),
                             attention_bias=attention_bias, mlp_bias=mlp_bias)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
    return out_dir


def weights_dtype(tensors: Mapping[str, np.ndarray]) -> str:
    """The dtype name ("float32", "bfloat16") config.json declares: the tensors' own, or where
    they differ the one holding the most parameters (transformers has one dtype per model)."""
    counts: dict[str, int] = {}
    for array in tensors.values():
        counts[array.dtype.name] = counts.get(array.dtype.name, 0) + array.size
    return max(counts, key=counts.get) if counts else "float32"


def load_in_transformers(folder: str | os.PathLike):
    """Our export as plain `transformers.LlamaForCausalLM` (float32, eval mode; needs torch).

    transformers 5's `LlamaConfig` refuses a hidden size that is not a multiple of the head count
    even with an explicit `head_dim` (Minitron width: 448 / 6), though its attention computes
    with `head_dim`: such a config is built with a head count that passes the check, then given
    the real one, and passed to `from_pretrained` (the weights are untouched)."""
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    raw = json.loads((Path(folder) / "config.json").read_text())
    heads, kv = raw["num_attention_heads"], raw["num_key_value_heads"]
    if raw["hidden_size"] % heads:
        config = HFLlamaConfig(**{**raw, "num_attention_heads": 1, "num_key_value_heads": 1})
        config.num_attention_heads, config.num_key_value_heads = heads, kv
    else:
        config = HFLlamaConfig(**raw)
    return LlamaForCausalLM.from_pretrained(folder, config=config, torch_dtype=torch.float32).eval()
