"""Predicted peak memory from a config alone (`nnxprune.plan`, `nnxprune.plan_check`) and what
`nnxprune prune --check` prints with it: on the public Llama-3.1-70B config given as a folder
with only config.json, the in-memory run is refused for a 24 GB budget with settings that fit."""

import json

import pytest

from nnxprune import cli, plan
from nnxprune.io.hf_config import config_from_hf
from nnxprune.recipes import load_recipe
from nnxprune.runner import check_recipe

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def llama31(hidden, intermediate, layers, heads) -> dict:
    """A public Llama-3.1 config.json (meta-llama/Llama-3.1-8B, -70B)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_scaling": ROPE,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}


L8B, L70B = llama31(4096, 14336, 32, 32), llama31(8192, 28672, 80, 64)


@pytest.fixture
def folder70b(tmp_path):
    """Llama-3.1-70B as a user has it before downloading: config.json alone."""
    folder = tmp_path / "llama-3.1-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(L70B))
    return folder


def test_parameter_counts_are_the_published_ones():
    assert plan.model_weights(config_from_hf(L8B)) == 8_030_261_248
    assert plan.model_weights(config_from_hf(L70B)) == 70_553_706_496


def test_streamed_peak_is_nearly_flat_in_model_size():
    """One layer + activations + overhead: the 8B's bf16 weights are 16 GB, its streamed peak
    (4 x 256 tokens) under 12 GB, and 70B's layer phase grows with its layer only."""
    c8, c70 = config_from_hf(L8B), config_from_hf(L70B)
    p8 = plan.streamed_memory(c8, "wanda", nsamples=4, seqlen=256, dtype="bfloat16")
    assert p8.host_bytes < 12e9 < plan.model_weights(c8) * 2
    p70 = plan.streamed_memory(c70, "wanda", nsamples=4, seqlen=256, dtype="bfloat16")
    ratio = plan.layer_weights(c70, 0) / plan.layer_weights(c8, 0)
    assert p70.parts["layer"] == pytest.approx(p8.parts["layer"] * ratio, rel=1e-6)
    assert p70.host_bytes < plan.model_weights(c70) * 2 / 8  # under an eighth of its weights


def test_terms_follow_the_settings():
    c = config_from_hf(L8B)
    base = plan.streamed_memory(c, "wanda", nsamples=8, seqlen=512, dtype="float32")
    more = plan.streamed_memory(c, "wanda", nsamples=16, seqlen=512, dtype="float32")
    assert more.parts["activations"] == 2 * base.parts["activations"]
    assert more.parts["activations"] == 3 * 16 * 512 * 4096 * 4  # inputs, pieces, concatenation
    gpt = plan.streamed_memory(c, "sparsegpt", nsamples=8, seqlen=512, dtype="float32")
    assert gpt.host_bytes - base.host_bytes == gpt.parts["hessians"] > 14336 ** 2 * 4
    bf16 = plan.streamed_memory(c, "wanda", nsamples=8, seqlen=512, dtype="bfloat16")
    assert base.parts["layer"] - bf16.parts["layer"] == plan.layer_weights(c, 0) * 2
    no_calib = plan.streamed_memory(c, "magnitude", nsamples=0, seqlen=0)
    assert no_calib.parts.get("activations", 0) == 0
    full = plan.in_memory_prune(c, "wanda", nsamples=8, seqlen=512, dtype="float32")
    assert full.host_bytes > plan.model_weights(c) * 4
    with pytest.raises(ValueError, match="no streamed plan"):
        plan.streamed_memory(c, "sheared", nsamples=8, seqlen=512)


def test_check_on_a_70b_config_alone(folder70b):
    """`--check` on a folder holding only config.json: shapes, parameters and the memory plan;
    the in-memory fp32 run (282 GB of weights) does not fit 24 GB, and what is suggested fits."""
    lines = []
    recipe = load_recipe("recipes/wanda.toml", [])
    out = check_recipe(recipe, model=str(folder70b), echo=lines.append, memory_budget=24)
    text = "\n".join(lines)
    assert out["dense"]["params"] == 70_553_706_496
    memory = out["memory"]
    assert memory["plan"]["host_gb"] > 282 and memory["fits"] is False
    assert "weights stored as bfloat16" in text and "too big" in text
    assert memory["alternatives"], text
    for alt in memory["alternatives"]:
        assert alt["host_gb"] <= 24
    # 128 x 2048 calibration tokens of a 8192-wide model are 8.6 GB per copy on the host:
    # streaming alone does not fit, fewer samples do
    assert any("calibration.nsamples=" in a["flags"] and "--stream" in a["flags"]
               for a in memory["alternatives"])


def test_check_streamed_fits_and_reads_the_budget(folder70b, monkeypatch, capsys):
    monkeypatch.setenv("NNXPRUNE_MEMORY_BUDGET_GB", "64")
    code = cli.main(["prune", "recipes/wanda.toml", "--model", str(folder70b), "--check",
                     "--stream", "--dtype", "bfloat16", "--set", "calibration.nsamples=16"])
    assert code == 0
    text = capsys.readouterr().out
    assert "prune --stream (wanda, bfloat16)" in text
    assert "fits      64.0 GB (NNXPRUNE_MEMORY_BUDGET_GB)" in text
    assert "device    predicted peak" in text


def test_budget_from_this_machine():
    available = plan.available_bytes()
    assert available is None or available > 0
    assert plan.budget_bytes(3.5) == (3_500_000_000, "--memory-budget")
