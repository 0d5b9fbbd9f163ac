"""The pruning benchmarks' bookkeeping (benchmarks/sparsity.py, benchmarks/sparsellm.py): which
rows run in which order, the specs they build, and the comparisons their tables print."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sparsellm as bench_sllm  # noqa: E402
import sparsity as bench_sparsity  # noqa: E402

from nnxprune.models.llama import LlamaConfig  # noqa: E402
from nnxprune.transforms import from_dict  # noqa: E402

CFG = LlamaConfig.uniform(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                          num_kv_heads=3, intermediate_size=1536)


def test_sparsity_rows_and_specs():
    args = SimpleNamespace(rows="wanda@0.5,owl-wanda@0.7", methods="", patterns="")
    assert bench_sparsity._jobs(args) == [("wanda", "0.5"), ("owl-wanda", "0.7")]
    args = SimpleNamespace(rows="", methods="magnitude,wanda", patterns="0.5,2:4")
    assert len(bench_sparsity._jobs(args)) == 4
    owl = bench_sparsity._spec("owl-wanda", "0.7", 8)
    assert owl == {"kind": "owl", "method": "wanda", "batch_size": 8, "sparsity": 0.7}
    assert bench_sparsity._spec("magnitude", "2:4", 8) == {"kind": "magnitude", "pattern": "2:4"}
    for spec in (owl, bench_sparsity._spec("wanda", "4:8", 8)):
        from_dict(spec).check(CFG)


def test_sparsity_comparisons():
    rows = [{"implementation": "nnxprune", "method": "wanda", "pattern": "50%", "ppl": 53.0, "prune_s": 100.0},
            {"implementation": "torch", "method": "wanda", "pattern": "50%", "ppl": 53.5, "prune_s": 160.0},
            {"implementation": "nnxprune", "method": "wanda", "pattern": "70%", "ppl": 1000.0, "prune_s": 90.0},
            {"implementation": "nnxprune", "method": "owl-wanda", "pattern": "70%", "ppl": 900.0,
             "prune_s": 180.0}]
    out = {c["kind"]: c for c in bench_sparsity.comparisons(rows)}
    assert out["torch_vs_nnxprune"]["speedup"] == pytest.approx(1.6)
    assert out["torch_vs_nnxprune"]["ppl_relative_difference"] == pytest.approx(53 / 53.5 - 1)
    assert out["owl_vs_uniform"]["ppl_relative_difference"] == pytest.approx(-0.1)
    assert out["owl_vs_uniform"]["time_ratio"] == pytest.approx(2.0)


def test_sparsellm_jobs_put_eight_rounds_last_and_specs_check():
    args = SimpleNamespace(variants="4,best,8", scopes="all", patterns="0.7,0.8", batch_size=8,
                           alphas="", betas="", no_sparsegpt=False)
    jobs = bench_sllm._jobs(args)
    assert jobs == [("sparsegpt", None, "0.7", "all", None), ("sparsellm", "4", "0.7", "all", None),
                    ("sparsellm", "best", "0.7", "all", None), ("sparsegpt", None, "0.8", "all", None),
                    ("sparsellm", "4", "0.8", "all", None), ("sparsellm", "best", "0.8", "all", None),
                    ("sparsellm", "8", "0.7", "all", None), ("sparsellm", "8", "0.8", "all", None)]
    for method, variant, pattern, scope, ab in jobs:
        t = from_dict(bench_sllm.spec_for(method, variant, pattern, scope, 30, args, ab))
        t.check(CFG)
        if variant in ("4", "best"):
            assert [t.rounds(i, 30) for i in (0, 1, 28, 29)] == [4, 1, 1, 1]
            assert t.keep_best == (variant == "best")
        elif variant == "8":
            assert t.rounds(1, 30) == 8 and not t.keep_best
    # the paper's protocol: an alpha x beta grid on the first half of the layers
    grid = SimpleNamespace(variants="4", scopes="half", patterns="0.8", batch_size=8,
                           alphas="0.1,10", betas="1", no_sparsegpt=True)
    jobs = bench_sllm._jobs(grid)
    assert jobs == [("sparsellm", "4", "0.8", "half", (0.1, 1.0)),
                    ("sparsellm", "4", "0.8", "half", (10.0, 1.0))]
    t = from_dict(bench_sllm.spec_for(*jobs[1][:4], 30, grid, jobs[1][4]))
    t.check(CFG)
    assert (t.alpha, t.beta, t.fraction) == (10.0, 1.0, 0.5)
    with pytest.raises(SystemExit, match="must be > 0"):
        bench_sllm._jobs(SimpleNamespace(**(vars(grid) | {"alphas": "0"})))
    with pytest.raises(SystemExit, match="unknown"):
        bench_sllm._jobs(SimpleNamespace(variants="16", scopes="all", patterns="0.7"))


def _fake_row(method, pattern, ab, ppl):
    spec = {"kind": method} | ({"alpha": ab[0], "beta": ab[1]} if ab else {})
    return {"method": method, "pattern": f"{float(pattern):.0%}", "spec": spec, "ppl": ppl,
            "key": [method, None if method == "sparsegpt" else "4", pattern, "half",
                    None if ab is None else list(ab)]}


def test_sparsellm_paper_protocol_grid_then_best_pair_at_70_and_90():
    args = SimpleNamespace(alphas="0.1,1,10", betas="0.1,1,10")
    first = bench_sllm.paper_jobs(args, [])
    assert first[0] == ("sparsegpt", None, "0.8", "half", None) and len(first) == 10
    assert {j[4] for j in first[1:]} == {(a, b) for a in (0.1, 1.0, 10.0) for b in (0.1, 1.0, 10.0)}
    rows = [_fake_row("sparsegpt", "0.8", None, 1000.0)]
    ppl = {(0.1, 0.1): 1200.0, (1.0, 10.0): 900.0}
    rows += [_fake_row("sparsellm", "0.8", j[4], ppl.get(j[4], 1100.0)) for j in first[1:-1]]
    assert bench_sllm.paper_jobs(args, rows) == first  # the grid is not complete: no 70/90% yet
    rows.append(_fake_row("sparsellm", "0.8", first[-1][4], ppl.get(first[-1][4], 1100.0)))
    assert bench_sllm.best_pair(rows) == (1.0, 10.0)
    assert bench_sllm.paper_jobs(args, rows)[10:] == [
        ("sparsegpt", None, "0.7", "half", None), ("sparsellm", "4", "0.7", "half", (1.0, 10.0)),
        ("sparsegpt", None, "0.9", "half", None), ("sparsellm", "4", "0.9", "half", (1.0, 10.0))]
    rows += [_fake_row("sparsegpt", "0.7", None, 100.0), _fake_row("sparsellm", "0.7", (1.0, 10.0), 150.0),
             _fake_row("sparsegpt", "0.9", None, 9000.0), _fake_row("sparsellm", "0.9", (1.0, 10.0), 6000.0)]
    s = bench_sllm.paper_summary(rows)
    assert s["best_pair"] == {"alpha": 1.0, "beta": 10.0}
    assert s["grid_80"]["1"]["10"] == 900.0 and s["grid_80"]["0.1"]["0.1"] == 1200.0
    assert [s["by_sparsity"][p]["sparsellm_below_sparsegpt"] for p in ("0.7", "0.8", "0.9")] == [
        False, True, True]
    assert s["by_sparsity"]["0.8"]["relative"] == pytest.approx(900 / 1000 - 1)
