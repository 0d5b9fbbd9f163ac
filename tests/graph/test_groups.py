"""Per-layer groups are derived from the channel spaces of the Linears in a layer, not from names."""

import dataclasses

import pytest
from flax import nnx

from nnxprune import layers as L
from nnxprune.errors import UserError
from nnxprune.graph import Group, Member, find_group, groups
from nnxprune.models.llama import LayerShape, Llama, LlamaConfig

DH = 8
LAYERS = (LayerShape(num_heads=6, num_kv_heads=2, intermediate_size=40),
          LayerShape(num_heads=4, num_kv_heads=4, intermediate_size=24),
          LayerShape(num_heads=3, num_kv_heads=1, intermediate_size=0),
          LayerShape(num_heads=0, num_kv_heads=0, intermediate_size=16))


def build(layers=LAYERS, head_dim: int = DH, tie: bool = False) -> Llama:
    cfg = LlamaConfig.uniform(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, intermediate_size=8, head_dim=head_dim,
                              tie_word_embeddings=tie, max_position_embeddings=64)
    return Llama(dataclasses.replace(cfg, layers=layers), rngs=nnx.Rngs(0))


def hand_written(i: int, shape: LayerShape) -> list[Group]:
    """The groups of layer `i` as the module paths of a Llama layer spell them out."""
    attn, mlp = ("layers", i, "self_attn"), ("layers", i, "mlp")
    n, k, f = shape.num_heads, shape.num_kv_heads, shape.intermediate_size
    out = []
    if k:
        per = n // k
        out.append(Group("kv", i, k, (
            Member((*attn, "k_proj"), "kernel", 1, DH, "head_dim"),
            Member((*attn, "v_proj"), "kernel", 1, DH, "head_dim"),
            Member((*attn, "q_proj"), "kernel", 1, per * DH, f"{per} query heads"),
            Member((*attn, "o_proj"), "kernel", 0, per * DH, f"{per} query heads"),
        ), description=f"KV heads; each takes its k and v head and its {per} query heads"))
        out.append(Group("q", i, n, (
            Member((*attn, "q_proj"), "kernel", 1, DH, "head_dim"),
            Member((*attn, "o_proj"), "kernel", 0, DH, "head_dim"),
        ), blocks=k, description=f"query heads, {per} per KV group; keep the same number in "
                                 f"each of the {k} KV groups"))
    out.append(Group("mlp", i, f, (
        Member((*mlp, "gate_proj"), "kernel", 1),
        Member((*mlp, "up_proj"), "kernel", 1),
        Member((*mlp, "down_proj"), "kernel", 0),
    ), description="MLP neurons"))
    out.append(Group("layer", i, 1, (Member(("layers", i), "", 0),),
                     description="the whole decoder layer"))
    return out


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_groups_equal_the_hand_written_members(tie):
    gs = groups(build(tie=tie))
    assert gs[1:] == [g for i, shape in enumerate(LAYERS) for g in hand_written(i, shape)]


def test_printed_group_matches_the_readme():
    model = build((LayerShape(num_heads=9, num_kv_heads=3, intermediate_size=8),), head_dim=64)
    assert str(find_group(model, "kv", 0)) == (
        "group kv[0]: 3 channels (KV heads; each takes its k and v head and its 3 query heads)\n"
        "  layers.0.self_attn.k_proj.kernel           axis 1  unit 64 (head_dim)\n"
        "  layers.0.self_attn.v_proj.kernel           axis 1  unit 64 (head_dim)\n"
        "  layers.0.self_attn.q_proj.kernel           axis 1  unit 192 (3 query heads)\n"
        "  layers.0.self_attn.o_proj.kernel           axis 0  unit 192 (3 query heads)")


def test_a_changed_space_changes_the_groups(monkeypatch):
    model = build()
    attn = model.layers[1].self_attn  # 4 query heads, 4 KV heads: q_heads and kv_heads are as wide
    monkeypatch.setattr(attn.v_proj, "out_space", L.Q_HEADS)
    kv, q = find_group(model, "kv", 1), find_group(model, "q", 1)
    path = ("layers", 1, "self_attn")
    assert [(m.path[-1], m.axis, m.unit) for m in kv.members] == [
        ("k_proj", 1, DH), ("q_proj", 1, DH), ("v_proj", 1, DH), ("o_proj", 0, DH)]
    assert [m.path[-1] for m in q.members] == ["q_proj", "v_proj", "o_proj"]
    assert q.members[1] == Member((*path, "v_proj"), "kernel", 1, DH, "head_dim")
    assert find_group(model, "kv", 0).members[1].path[-1] == "v_proj"  # other layers unchanged


def test_an_added_linear_joins_the_groups():
    model = build()
    mlp, attn = model.layers[0].mlp, model.layers[0].self_attn
    mlp.extra_proj = L.Linear(40, 32, in_space=L.MLP, out_space=L.EMBED, rngs=nnx.Rngs(1))
    attn.g_proj = L.Linear(32, 2 * DH, in_space=L.EMBED, out_space=L.KV_HEADS, out_unit=DH,
                           rngs=nnx.Rngs(2))
    assert [m.path[-1] for m in find_group(model, "mlp", 0).members] == [
        "gate_proj", "up_proj", "down_proj", "extra_proj"]
    assert [m.path[-1] for m in find_group(model, "kv", 0).members] == [
        "g_proj", "k_proj", "v_proj", "q_proj", "o_proj"]
    embed = {(m.path[-1], m.axis) for m in find_group(model, "embed").members if m.path[:2] == ("layers", 0)}
    assert {("extra_proj", 1), ("g_proj", 0)} <= embed


def _replace(attn, name: str, heads: int) -> None:
    """Replaces q_proj or o_proj of `attn` by one with `heads` query heads."""
    if name == "q_proj":
        attn.q_proj = L.Linear(32, heads * DH, in_space=L.EMBED, out_space=L.Q_HEADS, out_unit=DH,
                               rngs=nnx.Rngs(3))
    else:
        attn.o_proj = L.Linear(heads * DH, 32, in_space=L.Q_HEADS, out_space=L.EMBED, in_unit=DH,
                               rngs=nnx.Rngs(3))


def test_query_heads_must_split_over_the_kv_heads():
    model = build()
    attn = model.layers[0].self_attn  # 2 KV heads
    _replace(attn, "q_proj", 5)
    _replace(attn, "o_proj", 5)
    with pytest.raises(ValueError, match="layer 0: 5 query heads do not split into 2 KV groups"):
        groups(model)


def test_linears_must_agree_on_units_and_widths(monkeypatch):
    model = build()
    attn = model.layers[0].self_attn
    monkeypatch.setattr(attn.o_proj, "in_unit", 4)
    with pytest.raises(ValueError, match="layer 0: the Linears disagree on the unit of space 'q_heads'"):
        find_group(model, "q", 0)
    monkeypatch.undo()
    _replace(attn, "q_proj", 4)  # o_proj still reads 6 heads
    with pytest.raises(ValueError, match="layer 0: the Linears disagree on the width of space 'q_heads'"):
        find_group(model, "kv", 0)


def test_head_sizes_must_agree(monkeypatch):
    model = build()
    attn = model.layers[0].self_attn
    monkeypatch.setattr(attn.q_proj, "out_unit", DH // 2)
    monkeypatch.setattr(attn.o_proj, "in_unit", DH // 2)
    with pytest.raises(ValueError, match="disagree on the head size: 'kv_heads' unit 8, 'q_heads' unit 4"):
        find_group(model, "kv", 0)


def test_kv_heads_need_query_heads(monkeypatch):
    model = build()
    attn = model.layers[0].self_attn
    monkeypatch.setattr(attn.q_proj, "out_space", L.EMBED)
    monkeypatch.setattr(attn.o_proj, "in_space", L.EMBED)
    with pytest.raises(ValueError, match="no Linear uses 'q_heads'"):
        groups(model)


def test_layers_without_heads_or_mlp_spaces(monkeypatch):
    model = build()
    with pytest.raises(UserError, match=r"layer 3 has no 'q' group \(it has no attention heads left\)"):
        find_group(model, "q", 3)
    mlp = model.layers[3].mlp
    monkeypatch.setattr(mlp.gate_proj, "out_space", L.VOCAB)
    monkeypatch.setattr(mlp.up_proj, "out_space", L.VOCAB)
    monkeypatch.setattr(mlp.down_proj, "in_space", L.VOCAB)
    with pytest.raises(UserError, match="layer 3 has no 'mlp' group"):
        find_group(model, "mlp", 3)
