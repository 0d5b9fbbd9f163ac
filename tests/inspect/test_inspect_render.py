"""inspect.render: the annotated treescope HTML page and text tree, the PNG plot, and the files
`inspect_model` writes (only those asked for, atomically)."""

import dataclasses

import numpy as np
import pytest
from inspect_common import HETERO_LAYERS, build, n_of_m_mask, tiny

from nnxprune.inspect.render import inspect_model, plot_png, render_html, render_tree
from nnxprune.inspect.stats import DENSE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
