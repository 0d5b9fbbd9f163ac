"""Dynamic batch loading in Sheared LLaMA's pruning stage (`recovery.sheared_domains`) and the
hand-off of its final domain weights to continued pretraining (`recovery.sheared_handoff`): the
update interval, the update against the rule applied to the recorded losses, batches drawn by the
current weights, the evaluation gates against the reference's `_deterministic_z`, the weights in
the report and the checkpoint and as the recovery's initial weights, and the refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_cli
from flax import nnx
from recovery_common import CFG, domain_windows, tiny_model, windows

from nnxprune.algorithms import hard_concrete as hc
from nnxprune.errors import UserError
from nnxprune.recipes import load_recipe, parse_recipe
from nnxprune.recovery import continued_pretraining
from nnxprune.recovery import sheared_handoff as handoff
from nnxprune.recovery.dynamic import update_weights
from nnxprune.recovery.l0 import L0Module, ShearTarget
from nnxprune.recovery.losses import next_token_ce
from nnxprune.recovery.shear_model import masked_logits
from nnxprune.recovery.shear_train import train_masks
from nnxprune.recovery.sheared_domains import PruningDomains, current_gates
from nnxprune.transforms.sheared import Sheared

tiny_folder = test_cli.tiny_folder  # the tiny model + tokenizer fixture of the CLI tests

DOMAINS = {"easy": {"source": "c4", "weight": 2.0, "reference_loss": 1.0},
           "hard": {"source": "c4", "reference_loss": 4.0},
           "mid": {"source": "c4", "reference_loss": 2.0}}
TARGET = {"layers": 1, "heads": 2, "intermediate": 64, "hidden": 48}


def three_domains():
    return {**domain_windows(), "mid": windows(seed=3)}


def step(**overrides) -> Sheared:
    base = {**TARGET, "steps": 7, "batch_size": 4, "seqlen": 32, "lr": 1e-3, "update_every": 3,
            "eval_batches": 1, "domains": DOMAINS}
    return Sheared(**{**base, **overrides})


def run(sheared: Sheared):
    """The pruning stage on the tiny model; `(model, l0, result, PruningDomains)`, before the fold."""
    model = tiny_model(masked=False)
    l0 = L0Module(ShearTarget(**TARGET).resolve(CFG), rngs=nnx.Rngs(0))
    domains = PruningDomains(sheared.schedule(), three_domains())
    result = train_masks(model, l0, sheared.training(), None, progress=False, domains=domains)
    return model, l0, result, domains


def heldout_ce(model, l0, domains) -> dict[str, float]:
    """Each domain's held-out CE under `current_gates`, computed here without the stage's jit."""
    zs = current_gates(l0)
    return {n: float(np.mean([float(next_token_ce(masked_logits(model, zs, jnp.asarray(b)),
                                                   jnp.asarray(b))) for b in batches]))
            for n, batches in domains.loader.heldout.items()}


def test_weights_update_every_interval_by_the_rule_and_batches_follow_them():
    """Three domains, updates every 3 of 7 steps; "mid" has no reference loss and takes the
    explicit "initial-loss": measured before the first step, the weights unchanged then."""
    domains = {**DOMAINS, "mid": {"source": "c4"}}
    sheared = step(domains=domains, reference="initial-loss")
    start = heldout_ce(tiny_model(masked=False),
                       L0Module(ShearTarget(**TARGET).resolve(CFG), rngs=nnx.Rngs(0)),
                       PruningDomains(sheared.schedule(), three_domains()))
    model, l0, result, pruning = run(sheared)
    d = result.domains
    assert [h["step"] for h in d["history"]] == [3, 6, 7]  # every 3 steps, and the last
    assert d["update_every"] == 3 and d["dynamic"] is True
    names = d["names"]
    assert d["initial_weights"] == {"easy": 0.5, "hard": 0.25, "mid": 0.25}
    assert d["reference_from"] == {"easy": "recipe", "hard": "recipe", "mid": "start"}
    assert d["reference_losses"]["mid"] == pytest.approx(start["mid"], rel=1e-5)
    ref = np.array([d["reference_losses"][n] for n in names])
    assert ref[:2].tolist() == [1.0, 4.0]
    before = np.array([d["initial_weights"][n] for n in names])
    in_effect = []  # the weights each batch was drawn with
    for h, until in zip(d["history"], (3, 6, 7)):
        in_effect += [before] * (until - len(in_effect))
        losses = np.array([h["losses"][n] for n in names])
        after = np.array([h["weights"][n] for n in names])
        np.testing.assert_allclose(after, update_weights(before, losses, ref), rtol=1e-12)
        np.testing.assert_allclose([h["excess"][n] for n in names], losses - ref, rtol=1e-12)
        assert not np.allclose(after, before)  # every update moved them
        before = after
    assert abs(d["history"][0]["excess"]["mid"]) > 1e-4  # 3 steps of training moved its loss
    assert d["final_weights"] == d["history"][-1]["weights"]
    # the batches: each example's domain drawn by the weights in effect (the sampler's own rng)
    counts = np.zeros(3, int)
    for b, w in enumerate(in_effect):
        drawn = np.random.default_rng((0, 1 << 20, b)).choice(3, size=4, p=w)
        counts += np.bincount(drawn, minlength=3)
    assert d["draws"] == dict(zip(names, counts.tolist())) and counts.sum() == 7 * 4
    # the last recorded losses are the trained model's, under the current-size gates
    last = heldout_ce(model, l0, pruning)
    for n in names:
        assert d["history"][-1]["losses"][n] == pytest.approx(last[n], rel=1e-5)
    assert len(result.history) == 7 and result.history[-1]["expected_params"] > 0


def test_fixed_weights_stay():
    fixed = PruningDomains(step(dynamic=False).schedule(), three_domains())
    row = fixed.update(lambda batches: {"ce": 9.0, "loss": 9.0}, 3)  # far above every reference
    assert row["weight.easy"] == 0.5 and fixed.report()["dynamic"] is False
    assert fixed.report()["final_weights"] == {"easy": 0.5, "hard": 0.25, "mid": 0.25}
    assert fixed.report()["history"][0]["excess"]["hard"] == 5.0


def test_evaluation_gates_follow_the_reference_deterministic_z():
    """`current_gates` against a NumPy port of the reference's `_deterministic_z` with
    `eval_target_model = false`: per row, `round(size - sum(1 - cdf_qz))` smallest soft scores
    set to 0, the rest `sigmoid(0.8 log_alpha / beta)`; group-mode heads repeated per query head."""
    for target in (TARGET, {"heads": 2, "kv_heads": 1, "intermediate": 64}):
        l0 = L0Module(ShearTarget(**target).resolve(CFG), rngs=nnx.Rngs(0))
        rows = {}
        for i, name in enumerate(l0.plan.types):
            var = getattr(l0, f"{name}_log_alpha")
            var[...] = 2.5 * jax.random.normal(jax.random.key(i), var.shape)
            la = np.asarray(var[...], np.float64).reshape(-1, var.shape[-1])
            out = []
            for row in la:
                p_zero = np.clip(1 / (1 + np.exp(-(2 / 3 * np.log(0.1 / 1.1) - row))), 1e-6,
                                 1 - 1e-6)
                zeros = round(row.size - (1 - p_zero).sum())
                soft = 1 / (1 + np.exp(-row / (2 / 3) * 0.8))
                soft[np.argsort(soft, kind="stable")[:zeros]] = 0.0
                out.append(soft)
            rows[name] = np.stack(out).reshape(var.shape)
        zs = current_gates(l0)
        for name, expect in rows.items():
            got = np.asarray(zs[name])
            if name == "head" and l0.plan.head_mode == "group":
                got = got[:, ::l0.plan.group_size]
            np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7)
        assert any(0 < np.count_nonzero(v == 0) < v.size for v in rows.values())
    assert hc.MAGIC == 0.8 and hc.BETA == pytest.approx(2 / 3)


@pytest.mark.parametrize("overrides, message", [
    ({"domains": {"a": {"source": "c4"}, "b": {"source": "c4", "reference_loss": 2.0}}},
     "needs a reference loss for domain\\(s\\) a: .*\\[prune.reference.fit.NAME\\]"),
    ({"domains": {"a": {"source": "c4", "wieght": 2.0}}},
     "prune.domains.a: unknown key 'wieght'; did you mean 'weight'"),
    ({"domains": {"a": {"source": "c4", "weight": -1.0}}, "reference": "initial-loss"},
     "prune.domains.a: a domain's weight must be a number >= 0"),
    ({"domains": {"a": {"source": "c4", "weight": 0}}, "reference": "initial-loss"},
     "initial weights sum to 0"),
    ({"domains": {"a": {"source": "c4", "weight": "lots"}}, "reference": "initial-loss"},
     "weight must be a number"),
    ({"domains": {"a": {"weight": 1.0}}, "reference": "initial-loss"}, "needs a 'source'"),
    ({"domains": {"a": {"source": "c4"}}, "reference": "reference-model"},
     "pruning stage takes reference_loss"),
    ({"domains": {"a": {"source": "c4"}}, "reference": {"params": 9e7, "fit": {
        "b": {"E": 1.0, "A": 2.0, "alpha": 0.3}}}}, "prune.reference.fit.b: no such domain"),
    ({"domains": {"a": {"source": "c4"}}, "reference": "initial-loss", "update_every": 0},
     "update_every must be a positive integer"),
    ({"dynamic": True}, "sheared dynamic needs \\[prune.domains.NAME\\]"),
    ({"reference": "initial-loss"}, "sheared reference needs \\[prune.domains.NAME\\]"),
])
def test_bad_domain_settings_are_refused_when_the_recipe_is_read(overrides, message):
    data = {"recipe": {"name": "x"}, "prune": [{"kind": "sheared", "heads": 2, **overrides}]}
    with pytest.raises(UserError, match=message):
        parse_recipe(data)


def test_fixed_weights_need_no_reference_and_settings_round_trip():
    sheared = Sheared(heads=2, dynamic=False, domains={"a": {"source": "c4"}, "b": {
        "source": "c4", "weight": 3.0}})
    assert sheared.reference is None and sheared.dynamic is False
    again = parse_recipe({"prune": [sheared.to_dict()]}).pipeline.steps[0]
    assert again == sheared
    fit = {"params": 9e7, "fit": {"a": {"E": 1.9, "A": 410.0, "alpha": 0.34}}}
    with_fit = Sheared(heads=2, domains={"a": {"source": "c4"}}, reference=fit)
    assert with_fit.schedule().reference.predict("a") == pytest.approx(1.9 + 410 / 9e7 ** 0.34)
    assert parse_recipe({"prune": [with_fit.to_dict()]}).pipeline.steps[0] == with_fit


def test_handoff_rule_without_pruning_domains_or_with_fixed_recovery_weights():
    recipe = parse_recipe({
        "prune": [{"kind": "sheared", "heads": 2, "seqlen": 32, "domains": DOMAINS}],
        "recovery": {"kind": "pretrain", "eval_every": 2, "eval_batches": 1,
                     "domains": {n: {"source": "c4", "weight": 1.0, "reference_loss": 3.0}
                                 for n in DOMAINS}}})
    final = {"easy": 0.7, "hard": 0.2, "mid": 0.1}
    seeded, origin = handoff.seed_from_report(recipe.recovery, [
        {"kind": "sheared", "domains": {"dynamic": True, "final_weights": final}}])
    assert origin == handoff.ORIGIN and {n: d.weight for n, d in seeded.domains.items()} == final
    assert seeded.domains["easy"].reference_loss == 3.0
    same, origin = handoff.seed_from_report(recipe.recovery, [{"kind": "sheared", "steps": 3}])
    assert origin is None and same is recipe.recovery  # no domains in the pruning stage
    fixed = parse_recipe({**recipe.raw, "recovery": {**recipe.raw["recovery"], "dynamic": False}})
    assert handoff.seed_from_report(fixed.recovery, [
        {"kind": "sheared", "domains": {"dynamic": True, "final_weights": final}}])[1] is None
    other = {**recipe.raw, "recovery": {**recipe.raw["recovery"], "domains": {
        "easy": {"source": "c4", "reference_loss": 3.0}, "web": {"source": "c4",
                                                                 "reference_loss": 3.0}}}}
    with pytest.raises(UserError, match="recovery.domains \\(easy, web\\) differ from the domains "
                                        "of the sheared step \\(easy, hard, mid\\)"):
        parse_recipe(other).check(CFG)
    with pytest.raises(UserError, match="differ from the domains of the pruning stage"):
        continued_pretraining(tiny_model(), recipe.recovery, None, windows=three_domains(),
                              initial_weights={"easy": 0.5, "web": 0.5})  # before any training


PRUNE = """
[recipe]
name = "sheared-dynamic"
[[prune]]
kind = "sheared"
heads = 2
intermediate = 32
steps = 4
batch_size = 2
seqlen = 16
lr = 1e-3
update_every = 2
eval_batches = 1
[prune.domains.tower]
source = "A"
weight = 3.0
reference_loss = 2.0
[prune.domains.noise]
source = "B"
reference_loss = 3.0
"""

RECOVERY = """
[recovery]
kind = "pretrain"
steps = 2
batch_size = 2
seqlen = 16
warmup_steps = 1
eval_every = 1
eval_batches = 1
[recovery.domains.tower]
source = "A"
reference_loss = 2.0
[recovery.domains.noise]
source = "B"
reference_loss = 3.0
"""


def _files(tmp_path):
    (tmp_path / "a.txt").write_text("The tower is 324 metres tall and made of iron.\n" * 80)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"zq xv {i} " * 40}) + "\n"
                                              for i in range(10)))

    def write(name, text):
        path = tmp_path / name
        path.write_text(text.replace('"A"', f'"{tmp_path / "a.txt"}"')
                        .replace('"B"', f'"{tmp_path / "b.jsonl"}"'))
        return path
    return write


def test_final_weights_land_in_the_output_and_seed_continued_pretraining(capsys, tiny_folder,
                                                                          tmp_path):
    from nnxprune.io.checkpoint import read_meta

    cli, write = test_cli.run, _files(tmp_path)
    # 1. the pruning stage alone: the weights in the report and the checkpoint's provenance
    code, _, err = cli(capsys, "prune", write("prune.toml", PRUNE), "--model", tiny_folder,
                       "--out", tmp_path / "ckpt", "--json", tmp_path / "p.json", "--no-progress",
                       "--no-views")
    assert code == 0, err
    entry = json.loads((tmp_path / "p.json").read_text())["transforms"][0]
    d = entry["domains"]
    assert [h["step"] for h in d["history"]] == [2, 4] and d["names"] == ["tower", "noise"]
    assert d["initial_weights"] == {"tower": 0.75, "noise": 0.25}
    final = d["final_weights"]
    assert final == d["history"][-1]["weights"] and final != d["initial_weights"]
    assert read_meta(tmp_path / "ckpt")["provenance"][handoff.PROVENANCE_KEY] == final
    assert set(entry["data"]["domains"]) == {"tower", "noise"}
    # 2. `nnxprune train CKPT`: continued pretraining starts from them (other domains: refused
    # before the model loads)
    code, _, err = cli(capsys, "train", tmp_path / "ckpt", "--recipe", write(
        "web.toml", RECOVERY.replace("[recovery.domains.noise]", "[recovery.domains.web]")),
        "--json", tmp_path / "w.json", "--no-progress")
    test_cli.assert_user_error(code, err, "recovery.domains (tower, web) differ from the domains "
                                          "of the pruning stage that wrote")
    assert not (tmp_path / "w.json").exists()
    code, _, err = cli(capsys, "train", tmp_path / "ckpt", "--recipe",
                       write("cpt.toml", RECOVERY), "--json", tmp_path / "t.json",
                       "--no-progress")
    assert code == 0, err
    rec = json.loads((tmp_path / "t.json").read_text())["recovery"]
    assert rec["initial_weights_from"] == handoff.ORIGIN
    assert rec["domains"]["initial_weights"] == pytest.approx(final, rel=1e-12)
    # 3. one recipe with both stages: the same hand-off inside the run
    code, _, err = cli(capsys, "prune", write("both.toml", PRUNE + RECOVERY), "--model",
                       tiny_folder, "--json", tmp_path / "b.json", "--no-progress", "--no-views")
    assert code == 0, err
    both = json.loads((tmp_path / "b.json").read_text())
    pruned = both["transforms"][0]["domains"]["final_weights"]
    assert pruned == pytest.approx(final, rel=1e-6)  # the same pruning stage as run 1
    assert both["recovery"]["domains"]["initial_weights"] == pytest.approx(pruned, rel=1e-12)
    assert both["recovery"]["initial_weights_from"] == handoff.ORIGIN


def test_refusals_come_before_the_model_loads(capsys, no_loading, tiny_folder, tmp_path):
    cli, write = test_cli.run, _files(tmp_path)
    cases = [
        (PRUNE.replace("reference_loss = 2.0\n", "", 1), "sheared step: dynamic batch loading needs a reference loss for domain(s) tower"),
        (PRUNE.replace("weight = 3.0", "wieght = 3.0"), "did you mean 'weight'"),
        (PRUNE + RECOVERY.replace("[recovery.domains.noise]", "[recovery.domains.web]"),
         "recovery.domains (tower, web) differ from the domains of the sheared step"),
        (PRUNE.replace('"B"', '"missing.jsonl"'), "prune.domains.noise: ", "missing.jsonl"),
    ]
    for i, (text, *needles) in enumerate(cases):
        code, _, err = cli(capsys, "prune", write(f"r{i}.toml", text), "--model", tiny_folder,
                           "--json", tmp_path / f"r{i}.json", "--no-progress")
        test_cli.assert_user_error(code, err, *needles)
        assert not (tmp_path / f"r{i}.json").exists()
    assert load_recipe(write("ok.toml", PRUNE)).pipeline.steps[0].update_every == 2
