"""Per-device memory from XLA without the hardware (`nnxprune.plan_distributed`): the recovery step
and the Taylor pass compiled on an abstract model for forced CPU devices (in child processes).
FSDP divides the state by the devices, the per-layer extrapolation matches a full compile, and
`prune --check` prints the step's bytes for a recipe with [recovery]."""

import json

from nnxprune.models.llama import LlamaConfig
from nnxprune.plan_distributed import plan_in_child

CONFIG = LlamaConfig.uniform(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4,
                             num_kv_heads=2, intermediate_size=256, head_dim=16)
PRETRAIN = {"kind": "pretrain", "batch_size": 8, "seqlen": 32}


def _params(config) -> int:
    from nnxprune.plan import model_weights

    return model_weights(config)


def test_fsdp_divides_the_training_state_by_the_devices():
    spec = {"config": CONFIG.to_dict(), "step": "train", "recovery": PRETRAIN}
    replicated = plan_in_child({**spec, "mesh": {"data": 8, "fsdp": 1, "tensor": 1}})["bytes"]
    sharded = plan_in_child({**spec, "mesh": {"data": 1, "fsdp": 8, "tensor": 1}})["bytes"]
    state = 3 * 4 * _params(CONFIG)  # float32 weights and AdamW's two moments
    assert replicated["argument"] >= state
    assert sharded["argument"] < state / 8 * 1.2
    assert replicated["alias"] > 0.9 * state  # the donated state is updated in place
    assert sharded["peak"] == (sharded["argument"] + sharded["output"] - sharded["alias"]
                               + sharded["temp"])


def test_layer_extrapolation_matches_a_full_compile():
    spec = {"config": CONFIG.to_dict(), "step": "taylor", "nsamples": 8, "seqlen": 32,
            "mesh": {"data": 1, "fsdp": 4, "tensor": 2}}
    full = plan_in_child(spec)["bytes"]
    line = plan_in_child({**spec, "layers": [1, 2]})
    assert "extrapolated linearly to 4 layers" in line["method"]
    assert line["bytes"]["argument"] == full["argument"]  # the weights: exactly linear in depth
    assert line["bytes"]["output"] == full["output"]
    assert abs(line["bytes"]["peak"] / full["peak"] - 1) < 0.25


def test_check_prints_the_training_step_per_device(tmp_path, capsys):
    from nnxprune import cli
    from nnxprune.io.hf_config import config_to_hf

    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_hf(CONFIG)))
    code = cli.main(["prune", "recipes/wanda-2of4-distill.toml", "--model", str(folder), "--check",
                     "--set", "recovery.batch_size=2", "--set", "recovery.seqlen=32"])
    assert code == 0
    text = capsys.readouterr().out
    line = next(t for t in text.splitlines() if t.startswith("training") and "per device" in t)
    assert "per device (distill, mesh data=1, fsdp=1, tensor=1" in line
    # one device holds the student's weights and moments and the teacher's weights at least
    assert float(line.split()[1]) * 1e9 >= 4 * 4 * _params(CONFIG)
