"""Hugging Face config.json translation: what is read, what is refused, what is written."""

import dataclasses

import pytest
from flax import nnx

from nnxprune.io.hf_config import config_from_hf, config_to_hf
from nnxprune.models.llama import LayerShape, Llama, Llama3RopeScaling, LlamaConfig

LLAMA3 = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=32)
HETERO_LAYERS = (LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=128),
                 LayerShape(num_heads=2, num_kv_heads=1, intermediate_size=96))


def tiny(**kwargs) -> LlamaConfig:
    kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=128, head_dim=16, max_position_embeddings=128)
    kw.update(kwargs)
    return LlamaConfig.uniform(**kw)


# -- writing ---------------------------------------------------------------------------------------
def test_to_hf_refuses_heterogeneous_layers():
    cfg = dataclasses.replace(tiny(), layers=HETERO_LAYERS)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        config_to_hf(model.config)
    with pytest.raises(ValueError):
        config_to_hf(cfg)


def test_to_hf_with_no_layers_raises():
    with pytest.raises(ValueError):
        config_to_hf(dataclasses.replace(tiny(), layers=()))


# -- reading ---------------------------------------------------------------------------------------
HF_BASE = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": [2, 3],
}


@pytest.mark.parametrize("bad", [
    {"model_type": "mistral"},
    {"model_type": "qwen2"},
    {"attention_bias": True},
    {"mlp_bias": True},
    {"hidden_act": "gelu"},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
], ids=lambda d: "-".join(f"{k}" for k in d))
def test_from_hf_rejects_unsupported(bad):
    with pytest.raises(ValueError):
        config_from_hf({**HF_BASE, **bad})


def test_from_hf_plain():
    cfg = config_from_hf({**HF_BASE, "rope_theta": 12345.0})
    assert cfg == LlamaConfig.uniform(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, head_dim=16, rms_norm_eps=1e-5, rope_theta=12345.0,
        max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=(2, 3))


def test_from_hf_defaults_kv_heads_and_head_dim():
    hf = {k: v for k, v in HF_BASE.items() if k not in ("num_key_value_heads", "head_dim")}
    cfg = config_from_hf(hf)
    assert cfg.layers[0].num_kv_heads == 4
    assert cfg.head_dim == 16
    assert cfg.rope_theta == 10000.0
    assert cfg.rope_scaling is None


LLAMA3_HF = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 32}


def test_from_hf_transformers5_rope_parameters():
    cfg = config_from_hf({**HF_BASE, "rope_parameters": {**LLAMA3_HF, "rope_theta": 500000.0}})
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3
    default = config_from_hf({**HF_BASE, "rope_parameters": {"rope_type": "default",
                                                             "rope_theta": 7000.0}})
    assert default.rope_theta == 7000.0
    assert default.rope_scaling is None


@pytest.mark.parametrize("kind_key", ["rope_type", "type"])
def test_from_hf_legacy_rope_scaling(kind_key):
    scaling = {k: v for k, v in LLAMA3_HF.items() if k != "rope_type"}
    scaling[kind_key] = "llama3"
    cfg = config_from_hf({**HF_BASE, "rope_theta": 500000.0, "rope_scaling": scaling})
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA3
    plain = config_from_hf({**HF_BASE, "rope_scaling": None})
    assert plain.rope_scaling is None


def test_to_hf_from_hf_round_trip():
    cfg = tiny(rope_scaling=LLAMA3, rope_theta=500000.0, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=(2, 3))
    assert config_from_hf(config_to_hf(cfg)) == cfg
