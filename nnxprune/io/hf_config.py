"""Hugging Face `config.json` dicts to and from `LlamaConfig`.

`config_from_hf` reads a plain `LlamaForCausalLM` config (transformers 4 `rope_theta` +
`rope_scaling` or transformers 5 `rope_parameters`) and nnxprune's heterogeneous `nnxprune_llama`
variant, refusing anything it would misread (other activations, other RoPE scalings; biases
unless the caller places them: `hf_bias_flags`, read by `hf.load_hf_folder`).
`config_to_hf` writes a plain config for uniform layers and, when allowed, the `nnxprune_llama`
variant for layers of different shapes. The variant itself is described in `nnxprune.io.hf`.
(nnxprune's own checkpoint form is `LlamaConfig.to_dict` / `from_dict`.)

Example:
    >>> cfg = config_from_hf(json.loads(Path("model/config.json").read_text()))
    >>> config_from_hf(config_to_hf(cfg)) == cfg
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nnxprune.models.llama import LayerShape, Llama3RopeScaling, LlamaConfig

# nnxprune's Hugging Face config variant for layers of different shapes (see `nnxprune.io.hf`).
HETERO_MODEL_TYPE = "nnxprune_llama"
HETERO_ARCHITECTURE = "NnxpruneLlamaForCausalLM"
HETERO_LAYERS_KEY = "nnxprune_layers"
_HF_LAYER_FIELDS = (("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                    ("intermediate_size", "intermediate_size"))


def config_from_hf(hf: dict[str, Any], *, allow_bias: bool = False) -> LlamaConfig:
    """Reads a Hugging Face `LlamaConfig` dict (config.json).

    Also reads nnxprune's heterogeneous variant (`model_type = "nnxprune_llama"`, per-layer
    shapes in `nnxprune_layers`; the format is described in `nnxprune.io.hf`). `attention_bias`
    / `mlp_bias` are refused unless `allow_bias`: only a reader that places the biases
    (`hf.load_hf_folder`, reading `hf_bias_flags`) may accept them.
    """
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", HETERO_MODEL_TYPE):
        raise ValueError(f"model_type {model_type!r} is not supported "
                         f"(only 'llama' and nnxprune's {HETERO_MODEL_TYPE!r})")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag) and not allow_bias:
            raise ValueError(f"{flag}=true is not supported here (only by whole-model loading)")
    hf_bias_flags(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    for key in _REQUIRED:
        if key not in hf:
            raise ValueError(f"missing key {key!r}")
    for key in _POSITIVE:
        if hf.get(key) is not None:
            _positive_int(key, hf[key], 0 if key in ("num_hidden_layers", "intermediate_size") else 1)
    num_heads = hf["num_attention_heads"]
    if model_type == HETERO_MODEL_TYPE:
        layers = _parse_hetero_layers(hf)
    elif HETERO_LAYERS_KEY in hf:
        raise ValueError(f"{HETERO_LAYERS_KEY!r} is only read with model_type "
                         f"{HETERO_MODEL_TYPE!r}, but model_type is 'llama'")
    elif hf.get("per_layer_config"):
        raise ValueError("per-layer overrides ('per_layer_config') in a 'llama' config are not "
                         "supported")
    else:
        shape = LayerShape(num_heads=num_heads,
                           num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                           intermediate_size=hf["intermediate_size"])
        layers = (shape,) * hf["num_hidden_layers"]
    # transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) and not isinstance(hf[key], dict):
            raise ValueError(f"{key} must be an object such as {{\"rope_type\": \"llama3\", "
                             f"\"factor\": 8.0, ...}} or null, got {hf[key]!r}")
    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    eos = hf.get("eos_token_id")
    return validate_config(LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        layers=layers,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=_parse_rope_scaling(scaling),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    ))


_REQUIRED = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
             "intermediate_size")
_POSITIVE = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
             "num_hidden_layers", "intermediate_size", "head_dim", "max_position_embeddings")


def hf_bias_flags(hf: dict[str, Any]) -> tuple[bool, bool]:
    """`(attention_bias, mlp_bias)` of an HF config: biases on q, k, v, o / on gate, up, down."""
    flags = tuple(hf.get(flag, False) for flag in ("attention_bias", "mlp_bias"))
    for flag, value in zip(("attention_bias", "mlp_bias"), flags):
        if value not in (None, True, False):
            raise ValueError(f"{flag} must be true or false, got {value!r}")
    return tuple(bool(v) for v in flags)


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def validate_config(cfg: LlamaConfig) -> LlamaConfig:
    """`cfg` itself, after checking every value's type and range (ValueError naming the field):
    what a damaged or hand-edited config.json / nnxprune.json would otherwise crash on later."""
    for name in ("vocab_size", "hidden_size", "head_dim", "max_position_embeddings"):
        _positive_int(name, getattr(cfg, name))
    for name in ("rms_norm_eps", "rope_theta"):
        _positive_number(name, getattr(cfg, name))
    if not isinstance(cfg.layers, tuple) or not all(isinstance(s, LayerShape) for s in cfg.layers):
        raise ValueError(f"layers must be a list of per-layer shapes, got {cfg.layers!r}")
    for i, s in enumerate(cfg.layers):
        _positive_int(f"layers[{i}].num_heads", s.num_heads)
        _positive_int(f"layers[{i}].num_kv_heads", s.num_kv_heads)
        _positive_int(f"layers[{i}].intermediate_size", s.intermediate_size, 0)
        if s.num_heads % s.num_kv_heads:
            raise ValueError(f"layers[{i}]: num_heads ({s.num_heads}) is not a multiple of "
                             f"num_kv_heads ({s.num_kv_heads})")
    tokens = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
    for name, values in (("bos_token_id", (cfg.bos_token_id,)), ("eos_token_id", tokens)):
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
    if cfg.rope_scaling is not None:
        if not isinstance(cfg.rope_scaling, Llama3RopeScaling):
            raise ValueError(f"rope_scaling must be Llama-3 RoPE scaling or null, got "
                             f"{cfg.rope_scaling!r}")
        for f in dataclasses.fields(cfg.rope_scaling):
            _positive_number(f"rope_scaling.{f.name}", getattr(cfg.rope_scaling, f.name))
    if not isinstance(cfg.tie_word_embeddings, bool):
        raise ValueError(f"tie_word_embeddings must be true or false, got {cfg.tie_word_embeddings!r}")
    return cfg


def config_to_hf(config: LlamaConfig, *, allow_heterogeneous: bool = False,
                 dtype: str = "float32", attention_bias: bool = False,
                 mlp_bias: bool = False) -> dict[str, Any]:
    """A Hugging Face `LlamaConfig` dict.

    Uniform layer shapes give a plain `LlamaForCausalLM` config. Layers that differ (or no
    layers at all) raise `ValueError`, unless `allow_heterogeneous`: then the result is
    nnxprune's `nnxprune_llama` variant, with one entry per layer in `nnxprune_layers` and the
    usual per-layer fields set to the maxima over layers (see `nnxprune.io.hf`). `dtype` names
    the weights' dtype ("float32", "bfloat16"), written as `dtype` and `torch_dtype`;
    `attention_bias` / `mlp_bias` as HF places them (q, k, v, o / gate, up, down).
    """
    heterogeneous = not config.is_uniform or not config.layers
    if heterogeneous and not allow_heterogeneous:
        raise ValueError(
            "layers differ in shape (or there are none); plain Hugging Face Llama configs "
            "need uniform layers")
    if heterogeneous:
        if config.layers:
            shape = LayerShape(num_heads=max(s.num_heads for s in config.layers),
                               num_kv_heads=max(s.num_kv_heads for s in config.layers),
                               intermediate_size=max(s.intermediate_size for s in config.layers))
        else:  # no layers: placeholders only, nothing reads them
            heads = max(1, config.hidden_size // config.head_dim)
            shape = LayerShape(num_heads=heads, num_kv_heads=heads, intermediate_size=0)
    else:
        shape = config.layers[0]
    rope_scaling = None
    if config.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": attention_bias,
        "mlp_bias": mlp_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "dtype": dtype,  # the weights' dtype: transformers >= 4.56 reads `dtype` (dtype="auto"),
        "torch_dtype": dtype,  # older readers `torch_dtype`; given both, transformers 5 uses `dtype`
    }
    if heterogeneous:
        hf["architectures"] = [HETERO_ARCHITECTURE]
        hf["model_type"] = HETERO_MODEL_TYPE
        hf[HETERO_LAYERS_KEY] = [dataclasses.asdict(s) for s in config.layers]
        # The same sizes in transformers' own vocabulary (its `HeterogeneousConfigMixin`), for
        # transformers only: a plain `LlamaForCausalLM.from_pretrained` then refuses even with
        # `ignore_mismatched_sizes=True`. nnxprune reads `nnxprune_layers` alone.
        overrides = {}
        for i, s in enumerate(config.layers):
            diff = {hf_name: getattr(s, name) for name, hf_name in _HF_LAYER_FIELDS
                    if getattr(s, name) != getattr(shape, name)}
            if diff:
                overrides[str(i)] = diff
        if overrides:
            hf["per_layer_config"] = overrides
    return hf


def _parse_hetero_layers(hf: dict[str, Any]) -> tuple[LayerShape, ...]:
    """The validated `nnxprune_layers` list of a `nnxprune_llama` config."""
    entries = hf.get(HETERO_LAYERS_KEY)
    if not isinstance(entries, list):
        raise ValueError(f"model_type {HETERO_MODEL_TYPE!r} needs {HETERO_LAYERS_KEY!r}, a list with "
                         f"one entry per layer (got {type(entries).__name__})")
    if len(entries) != hf["num_hidden_layers"]:
        raise ValueError(f"{HETERO_LAYERS_KEY!r} has {len(entries)} entries but num_hidden_layers "
                         f"is {hf['num_hidden_layers']}")
    fields = [f.name for f in dataclasses.fields(LayerShape)]
    layers = []
    for i, entry in enumerate(entries):
        where = f"{HETERO_LAYERS_KEY}[{i}]"
        if not isinstance(entry, dict) or set(entry) != set(fields):
            raise ValueError(f"{where} must be an object with exactly the keys {fields}, got {entry!r}")
        for name in fields:
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{where}.{name} must be a positive integer, got {value!r}")
        if entry["num_heads"] % entry["num_kv_heads"]:
            raise ValueError(f"{where}: num_heads ({entry['num_heads']}) is not a multiple of "
                             f"num_kv_heads ({entry['num_kv_heads']})")
        layers.append(LayerShape(**entry))
    return tuple(layers)


def _parse_rope_scaling(scaling: dict[str, Any] | None) -> Llama3RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (only 'llama3')")
    values = {}
    for f in dataclasses.fields(Llama3RopeScaling):
        value = scaling[f.name]  # KeyError: "missing key"
        try:
            values[f.name] = (int if f.name == "original_max_position_embeddings" else float)(value)
        except (TypeError, ValueError):
            raise ValueError(f"rope_scaling.{f.name} must be a number, got {value!r}") from None
    return Llama3RopeScaling(**values)
