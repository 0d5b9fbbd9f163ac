"""The `[recovery]` recipe section: parsed into `RecoveryConfig`, validated strictly before any
work (unknown keys name the nearest valid one), overridable with --set."""

import re
from pathlib import Path

import pytest

from nnxprune.errors import UserError
from nnxprune.graph.targets import layer_projection_names
from nnxprune.models.llama import LlamaConfig
from nnxprune.recipes import load_recipe
from nnxprune.recovery import LoRAConfig, RecoveryConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SMOL = LlamaConfig.uniform(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                           num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                           tie_word_embeddings=True)

GOOD = """
[recipe]
name = "r"
[recovery]
kind = "lora"
steps = 5
batch_size = 4
grad_accum = 2
seqlen = 64
compute_dtype = "bfloat16"
[recovery.lora]
targets = 'layers\\.\\d+\\.mlp\\..*'
rank = 4
alpha = 8.0
[recovery.mesh]
data = 1
fsdp = -1
"""


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_good_recipe_and_overrides(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), ["recovery.steps=7", "recovery.lora.rank=2"])
    rec = recipe.recovery
    assert isinstance(rec, RecoveryConfig)
    assert (rec.kind, rec.steps, rec.micro_batch, rec.lora.rank, rec.lora.alpha) == ("lora", 7, 2, 2, 8.0)
    assert rec.distill is None and rec.compute_dtype == "bfloat16"
    assert rec.check(SMOL, device_count=2) == {"data": 1, "fsdp": 2, "tensor": 1}
    assert RecoveryConfig.from_dict(rec.to_dict()) == rec  # round trip


def test_bundled_distill_recipe():
    recipe = load_recipe(RECIPES / "wanda-2of4-distill.toml")
    assert recipe.recovery.kind == "distill" and recipe.recovery.distill.temperature == 1.0
    recipe.check(SMOL)


@pytest.mark.parametrize("text, match", [
    ("[recovery]\nkind = 'distil'\n", "did you mean 'distill'"),
    ("[recovery]\nsteps = 3\n", "needs a 'kind'"),
    ("[recovery]\nkind = 'pretrain'\nstep = 3\n", "did you mean 'steps'"),
    ("[recovery]\nkind = 'pretrain'\nlr = -1.0\n", "recovery.lr must be a number > 0"),
    ("[recovery]\nkind = 'pretrain'\nsteps = 0\n", "recovery.steps must be an integer >= 1"),
    ("[recovery]\nkind = 'pretrain'\nbatch_size = 6\ngrad_accum = 4\n", "not divisible by grad_accum"),
    ("[recovery]\nkind = 'pretrain'\ncompute_dtype = 'bf16'\n", "dtype"),
    ("[recovery]\nkind = 'pretrain'\ndataset = 'c5'\n", "did you mean 'c4'"),
    ("[recovery]\nkind = 'distill'\n[recovery.distill]\ntemprature = 2.0\n", "did you mean 'temperature'"),
    ("[recovery]\nkind = 'distill'\n[recovery.lora]\nrank = 2\n", "only applies to kind = 'lora'"),
    ("[recovery]\nkind = 'lora'\n[recovery.lora]\ntargets = '('\n", "not a valid regex"),
    ("[recovery]\nkind = 'lora'\n[recovery.lora]\nignore = '['\n", "ignore '\\[' is not a valid regex"),
    ("[recovery]\nkind = 'lora'\n[recovery.lora]\nrank = 0\n", "rank must be an integer >= 1"),
    ("[recovery]\nkind = 'pretrain'\n[recovery.mesh]\ndata = -1\nfsdp = -1\n", "at most one axis"),
    ("[recovery]\nkind = 'pretrain'\n[recovery.mesh]\ndatta = 2\n", "did you mean 'data'"),
])
def test_bad_recovery_sections(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_recipe(write(tmp_path, text))


def test_checked_against_the_pruned_model_before_work(tmp_path):
    text = GOOD.replace("mlp", "lm_head")  # layers.N.lm_head.*: no such projection
    recipe = load_recipe(write(tmp_path, text))
    with pytest.raises(UserError, match="matches no projection"):
        recipe.check(SMOL)
    recipe = load_recipe(write(tmp_path, GOOD), ["recovery.seqlen=9000"])
    with pytest.raises(UserError, match="beyond the model's context"):
        recipe.check(SMOL)


@pytest.mark.parametrize("pattern", [r".*_proj", r".*mlp\..*", ".*mlp.*", r"layers\.\d+\.mlp\..*",
                                     r"layers\.\d+\.(self_attn\.q_proj|mlp\..*)"])
def test_lora_targets_written_for_a_full_match_select_the_same_projections(pattern):
    names = layer_projection_names(SMOL.num_layers)
    assert LoRAConfig(targets=pattern).select(names) == [n for n in names if re.fullmatch(pattern, n)]


def test_lora_targets_follow_the_pruning_rule():
    names = layer_projection_names(2)
    assert LoRAConfig().select(names) == names  # default: every projection of every layer
    assert LoRAConfig(targets="mlp", ignore=r"layers\.0\.").select(names) == [
        "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(UserError, match=r"recovery\.lora\.targets regex 'lm_head' matches no projection"):
        LoRAConfig(targets="lm_head").select(names)
    with pytest.raises(UserError, match=r"recovery\.lora\.ignore regex 'x' matches no targeted"):
        LoRAConfig(ignore="x").select(names)
    with pytest.raises(UserError, match="no projection left after recovery.lora.targets"):
        LoRAConfig(ignore="proj").select(names)
