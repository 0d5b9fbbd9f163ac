"""nnxprune checkpoints: round trips with masks and heterogeneous shapes; damaged checkpoints
give one clear UserError, never a traceback or a wrong model."""

import json
import shutil

import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.graph import find_group, mask_group, take
from nnxprune.io.checkpoint import load_checkpoint, read_meta, save_checkpoint
from nnxprune.models.llama import Llama, LlamaConfig

CFG = LlamaConfig.uniform(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=32, head_dim=4)
TOKENS = np.arange(12, dtype=np.int32).reshape(1, 12)


@pytest.fixture
def saved(tmp_path):
    model = randomize_params(Llama(CFG, rngs=nnx.Rngs(0)))
    take(model, find_group(model, "mlp", 1), range(0, 32, 2))
    mask_group(model, find_group(model, "q", 0), [0, 2])
    path = save_checkpoint(model, tmp_path / "ckpt", provenance={"recipe": {"prune": []}})
    return model, path


def test_round_trip_heterogeneous_with_masks(saved):
    model, path = saved
    back = load_checkpoint(path)
    assert back.config == model.config and back.config.layers[1].intermediate_size == 16
    np.testing.assert_array_equal(np.asarray(back(TOKENS)), np.asarray(model(TOKENS)))
    meta = read_meta(path)
    assert meta["provenance"]["recipe"] == {"prune": []} and "saved" in meta["provenance"]


def _edit_meta(path, edit):
    meta = json.loads((path / "nnxprune.json").read_text())
    edit(meta)
    (path / "nnxprune.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, match", [
    (lambda p: (p / "nnxprune.json").unlink(), "not an nnxprune checkpoint"),
    (lambda p: shutil.rmtree(p / "state"), "no state/ folder"),
    (lambda p: (p / "nnxprune.json").write_text("{"), "not valid JSON"),
    (lambda p: _edit_meta(p, lambda m: m["config"]["layers"][0].update(intermediate_size=24)),
     "does not match the shapes"),
    (lambda p: _edit_meta(p, lambda m: m["config"].update(layers=m["config"]["layers"][:1])),
     "does not match the shapes"),
    (lambda p: _edit_meta(p, lambda m: m.pop("config")), "bad config"),
    (lambda p: [f.unlink() for f in (p / "state").rglob("*") if f.is_file() and f.parent.name == "d"],
     "incomplete"),
])
def test_damaged_checkpoints(saved, damage, match):
    _, path = saved
    damage(path)
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)
