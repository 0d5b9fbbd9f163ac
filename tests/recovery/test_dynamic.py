"""Dynamic batch loading (Sheared LLaMA): the weight update against its closed form (toward the
domain furthest above its reference, summing to 1, smoothed), the sampler's domain frequencies,
the `[recovery.domains]` config, reference losses (recipe, scaling-law fit, the refusal without
one, the explicit "initial-loss" opt-in), and tiny end-to-end runs in dynamic and fixed mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_cli
from recovery_common import (DOMAIN_MESH_RUN, DOMAINS, config, domain_windows, tiny_model)

from nnxprune.errors import UserError
from nnxprune.recipes import load_recipe
from nnxprune.recovery import RecoveryConfig, continued_pretraining, train
from nnxprune.recovery.dynamic import SMOOTHING, DomainLoader, DomainSampler, update_weights
from nnxprune.recovery.scaling_law import ScalingFit

tiny_folder = test_cli.tiny_folder  # the tiny model + tokenizer fixture of the CLI tests


def test_update_moves_toward_the_larger_excess_and_sums_to_one():
    w = np.array([0.5, 0.3, 0.2])
    losses, ref = np.array([3.0, 2.5, 2.0]), np.array([2.0, 2.4, 2.2])  # excess 1.0, 0.1, -0.2
    new = update_weights(w, losses, ref)
    assert new.sum() == pytest.approx(1.0, abs=1e-12)
    assert new[0] > w[0] and new[2] < w[2]
    a = w * np.exp(losses - ref)
    expected = (1 - SMOOTHING) * a / a.sum() + SMOOTHING / 3
    np.testing.assert_allclose(new, expected, rtol=1e-12)
    # zero excess: only the smoothing acts
    np.testing.assert_allclose(update_weights(w, ref, ref), (1 - SMOOTHING) * w + SMOOTHING / 3)
    # the paper's clipped form: a domain below its reference counts as 0 excess
    clipped = update_weights(w, losses, ref, clip=True)
    a = w * np.exp(np.maximum(losses - ref, 0))
    np.testing.assert_allclose(clipped, (1 - SMOOTHING) * a / a.sum() + SMOOTHING / 3)


def test_smoothing_keeps_every_domain_alive():
    w = np.array([1.0, 0.0, 0.0])  # an unnormalized start, two domains at zero
    new = update_weights(w, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], smoothing=0.1)
    np.testing.assert_allclose(new, [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    huge = update_weights([1 / 3] * 3, [500.0, 0.0, 0.0], [0.0] * 3, smoothing=0.1)
    np.testing.assert_allclose(huge, [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    assert np.all(np.isfinite(huge))
    with pytest.raises(UserError, match="sum to more than 0"):
        update_weights([0.0, 0.0], [1.0, 1.0], [0.0, 0.0])


def _domains(n_train=(200, 200, 200)):
    return [np.full((n, 4), d, np.int32) + np.arange(n, dtype=np.int32)[:, None] * 10
            for d, n in enumerate(n_train)]


def test_sampler_follows_the_weights_deterministically_and_resumes():
    weights = [0.6, 0.3, 0.1]
    sampler = DomainSampler(_domains(), weights, batch_size=8, grad_accum=2, seed=3)
    batches = [sampler.next_batch() for _ in range(500)]
    assert batches[0][0].shape == (2, 4, 4) and batches[0][0].dtype == np.int32
    domains = np.concatenate([d for _, d in batches])
    freq = np.bincount(domains, minlength=3) / len(domains)
    np.testing.assert_allclose(freq, weights, atol=0.02)  # 4000 draws: sd <= 0.008
    rows = np.concatenate([b.reshape(-1, 4) for b, _ in batches])
    np.testing.assert_array_equal(rows[:, 0] % 10, domains)  # each row comes from its domain
    # every window of a domain is used once before any repeats
    first = rows[domains == 0][:200, 0]
    assert len(set(first.tolist())) == 200
    again = DomainSampler(_domains(), weights, batch_size=8, grad_accum=2, seed=3)
    for _ in range(7):
        again.next_batch()
    state = json.loads(json.dumps(again.get_state()))
    resumed = DomainSampler(_domains(), [1, 1, 1], batch_size=8, grad_accum=2, seed=3)
    resumed.set_state(state)
    for i in range(7, 12):
        np.testing.assert_array_equal(resumed.next_batch()[0], batches[i][0])
    other = DomainSampler(_domains(), weights, batch_size=8, grad_accum=2, seed=4)
    assert not np.array_equal(other.next_batch()[1], batches[0][1])
    sampler.weights = np.array([0.0, 0.0, 1.0])  # a changed weight acts on the next batch
    assert set(sampler.next_batch()[1].tolist()) == {2}




@pytest.mark.parametrize("overrides, message", [
    ({"dynamic": True}, "needs \\[recovery.domains.NAME\\]"),
    ({"domains": DOMAINS, "dynamic": "yes"}, "dynamic must be true or false"),
    ({"domains": DOMAINS, "eval_every": 0}, "needs eval_every >= 1 and eval_batches >= 1"),
    ({"domains": DOMAINS, "eval_batches": 0}, "needs eval_every >= 1"),
    ({"domains": {"a": {"source": "c4", "wieght": 2}}}, "recovery.domains.a: .*'weight'"),
    ({"domains": {"a": {"source": "c4", "weight": 0}}}, "sum to 0"),
    ({"domains": DOMAINS, "dataset": "x.jsonl", "prompt_template": "alpaca"},
     "prompt_template does not apply"),
    ({"domian": DOMAINS}, "did you mean 'domains'"),
    ({"domains": DOMAINS}, "reference loss for domain\\(s\\) easy, hard: give reference_loss"),
    ({"domains": DOMAINS, "reference": "initial"}, "did you mean 'initial-loss'"),
    ({"domains": DOMAINS, "reference": {"params": 1e8, "fit": {"easy": {"E": 1.0, "A": 2.0}}}},
     "fit.easy needs alpha"),
    ({"domains": DOMAINS, "reference": {"fit": {"easy": {"E": 1.0, "A": 2.0, "alpha": 0.3}}}},
     "reference.params .* is needed"),
    ({"domains": DOMAINS, "reference": {"params": 1e8, "fit": {"esay": {"E": 1, "A": 2,
                                                                        "alpha": 0.3}}}},
     "fit.esay: no such domain"),
    ({"domains": DOMAINS, "reference": {"params": 1e8, "fit": {
        "easy": {"E": 1, "A": 2, "alpha": 0.3, "B": 5, "beta": 0.2}}}}, "reference.tokens is needed"),
    ({"reference": "initial-loss"}, "applies to \\[recovery.domains.NAME\\]"),
])
def test_config_errors(overrides, message):
    base = {"kind": "pretrain", "eval_every": 5, "eval_batches": 1}
    with pytest.raises(UserError, match=message):
        RecoveryConfig.from_dict({**base, **overrides})


def test_recipe_tables(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[recipe]\nname = "cpt"\n[recovery]\nkind = "pretrain"\nsteps = 4\n'
                    'eval_every = 2\neval_batches = 1\n'
                    '[recovery.domains.news]\nsource = "c4"\ncategory = "news"\nweight = 2.0\n'
                    '[recovery.domains.rest]\nsource = "c4"\nurl = "example"\n'
                    'reference_loss = 2.5\n'
                    '[recovery.reference]\nparams = 9.0e7\n'
                    '[recovery.reference.fit.news]\nE = 1.9\nA = 410.0\nalpha = 0.34\n')
    cfg = load_recipe(path).recovery
    assert cfg.reference.fit["news"] == ScalingFit(E=1.9, A=410.0, alpha=0.34)
    assert cfg.dynamic is True and list(cfg.domains) == ["news", "rest"]
    assert cfg.domains["news"].weight == 2.0 and cfg.domains["rest"].reference_loss == 2.5
    assert cfg.to_dict()["domains"]["news"]["category"] == "news"
    assert RecoveryConfig.from_dict(cfg.to_dict()) == cfg


def run(tmp_path, **overrides):
    cfg = config(steps=12, batch_size=8, eval_every=4, eval_batches=1, domains=DOMAINS,
                 reference="initial-loss", **overrides)  # the explicit opt-in: the old default
    return train(tiny_model(), cfg, windows=domain_windows(), log_dir=tmp_path, progress=False)


def test_dynamic_run_end_to_end(tmp_path):
    result = run(tmp_path / "dyn")
    d = result.domains
    assert [h["step"] for h in d["history"]] == [0, 4, 8, 12]
    assert d["reference_from"] == {"easy": "start", "hard": "start"}
    assert d["reference_losses"] == d["history"][0]["losses"]  # the start model's own losses
    first, last = d["history"][1], d["history"][-1]
    # the easy domain falls far below its reference, the noise cannot: weight moves to "hard"
    assert last["excess"]["easy"] < last["excess"]["hard"]
    assert first["weights"]["hard"] > 0.5 and last["weights"]["hard"] > first["weights"]["hard"]
    for h in d["history"]:
        assert sum(h["weights"].values()) == pytest.approx(1.0)
    assert sum(d["draws"].values()) == 12 * 8 and d["draws"]["hard"] > d["draws"]["easy"]
    assert d["final_mean_excess"] == pytest.approx(np.mean(list(last["excess"].values())))
    assert last["losses"]["easy"] < 0.9 * d["history"][0]["losses"]["easy"]  # it did train
    assert len(result.losses) == 12 and set(result.data["domains"]) == {"easy", "hard"}
    rows = [json.loads(line) for line in (tmp_path / "dyn" / "metrics.jsonl").read_text()
            .splitlines()]
    held = [r for r in rows if r["split"] == "heldout"]
    assert [r["step"] for r in held] == [0, 4, 8, 12]
    assert held[-1]["weight.hard"] == pytest.approx(last["weights"]["hard"])
    assert held[-1]["ce.easy"] == pytest.approx(last["losses"]["easy"])
    assert json.loads((tmp_path / "dyn" / "domains.json").read_text())["history"] == d["history"]
    assert (tmp_path / "dyn" / "domain_weights.png").stat().st_size > 1000
    # fixed weights: the same run, weights never move, draws close to half and half
    fixed = run(tmp_path / "fixed", dynamic=False).domains
    assert all(h["weights"] == {"easy": 0.5, "hard": 0.5} for h in fixed["history"])
    assert fixed["history"][0]["losses"] == d["history"][0]["losses"]
    assert fixed["draws"]["hard"] < d["draws"]["hard"]


def test_continued_pretraining_with_a_reference_model(tmp_path):
    cfg = config(steps=4, batch_size=8, eval_every=2, eval_batches=1,
                 domains={"easy": {"source": "c4"}, "hard": {"source": "c4",
                                                              "reference_loss": 1.0}},
                 reference="reference-model")
    reference = tiny_model(seed=5)
    result = continued_pretraining(tiny_model(), cfg, None, windows=domain_windows(),
                                   reference_model=reference)
    d = result.domains
    assert d["reference_from"] == {"easy": "reference model", "hard": "recipe"}
    assert d["reference_losses"]["hard"] == 1.0
    # the reference model's loss differs from the trained model's start
    assert d["reference_losses"]["easy"] != pytest.approx(d["history"][0]["losses"]["easy"])
    with pytest.raises(UserError, match="needs \\[recovery.domains.NAME\\]"):
        continued_pretraining(tiny_model(), config(), None)


def test_reference_losses_from_a_scaling_law_fit():
    """The fit evaluated at the target size, by hand: L = E + A / N^alpha + B / D^beta; a
    recipe's reference_loss wins over the fit; no training needed (the loader alone)."""
    fits = {"easy": {"E": 1.5, "A": 300.0, "alpha": 0.3},
            "hard": {"E": 2.0, "A": 50.0, "alpha": 0.25, "B": 400.0, "beta": 0.28}}
    cfg = config(steps=4, batch_size=8, eval_every=2, eval_batches=1, domains=DOMAINS,
                 reference={"params": 1.3e9, "tokens": 5.0e10, "fit": fits})
    loader = DomainLoader(cfg, domain_windows())
    assert loader.reference["easy"] == pytest.approx(1.5 + 300.0 / 1.3e9 ** 0.3, rel=1e-12)
    assert loader.reference["hard"] == pytest.approx(
        2.0 + 50.0 / 1.3e9 ** 0.25 + 400.0 / 5.0e10 ** 0.28, rel=1e-12)
    assert loader.reference_from == {"easy": "scaling law", "hard": "scaling law"}
    assert loader.reference["easy"] == pytest.approx(2.05327, abs=1e-5)  # 1.3e9^0.3 = 542.229
    mixed = config(steps=4, batch_size=8, eval_every=2, eval_batches=1,
                   domains={"easy": {"source": "c4", "reference_loss": 0.5},
                            "hard": {"source": "c4"}},
                   reference={"params": 1.3e9, "fit": {"easy": fits["easy"],
                                                       "hard": {"E": 2.0, "A": 50.0,
                                                                "alpha": 0.25}}})
    loader = DomainLoader(mixed, domain_windows())
    assert loader.reference == {"easy": 0.5, "hard": pytest.approx(2.0 + 50.0 / 1.3e9 ** 0.25)}
    assert loader.reference_from == {"easy": "recipe", "hard": "scaling law"}
    # fixed weights need no reference: the start loss labels the report, as before
    assert DomainLoader(config(steps=4, batch_size=8, eval_every=2, eval_batches=1,
                               domains=DOMAINS, dynamic=False),
                        domain_windows()).reference_from == {"easy": "start", "hard": "start"}


def test_resume_in_domain_mode_equals_uninterrupted(tmp_path):
    run_cfg = dict(steps=6, batch_size=8, eval_every=2, eval_batches=1, checkpoint_every=2,
                   domains=DOMAINS, reference="initial-loss")
    full = train(tiny_model(), config(**run_cfg), windows=domain_windows(), progress=False,
                 log_dir=tmp_path / "full")
    first = train(tiny_model(), config(**run_cfg), windows=domain_windows(), progress=False,
                  log_dir=tmp_path / "cut", stop_after=3)
    second = train(tiny_model(), config(**run_cfg), windows=domain_windows(), progress=False,
                   log_dir=tmp_path / "cut")  # resumes from step 2: weights, draws, references
    assert second.resumed_from == 2
    np.testing.assert_array_equal(first.losses[:2] + second.losses, full.losses)
    assert second.domains["history"] == full.domains["history"]
    assert second.domains["draws"] == full.domains["draws"]


def test_train_command_with_domains(capsys, tiny_folder, tmp_path):
    cli = test_cli.run

    (tmp_path / "a.txt").write_text("The tower is 324 metres tall and made of iron.\n" * 80)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"zq xv {i} " * 40}) + "\n"
                                              for i in range(10)))
    body = ('[recovery]\nkind = "pretrain"\nsteps = 4\nbatch_size = 2\nseqlen = 16\n'
            'warmup_steps = 1\neval_every = 2\neval_batches = 1\n'
            f'[recovery.domains.tower]\nsource = "{tmp_path / "a.txt"}"\n'
            f'[recovery.domains.noise]\nsource = "{tmp_path / "b.jsonl"}"\nweight = 3\n')
    (tmp_path / "none.toml").write_text(body)  # no reference loss: refused before any work
    code, _, err = cli(capsys, "train", tiny_folder, "--recipe", tmp_path / "none.toml", "--json",
                       tmp_path / "none.json", "--no-progress")
    test_cli.assert_user_error(code, err, "dynamic batch loading needs a reference loss")
    assert not (tmp_path / "none.json").exists() and not (tmp_path / "none.train").exists()
    body = body.replace('eval_batches = 1\n', 'eval_batches = 1\nreference = "initial-loss"\n', 1)
    (tmp_path / "r.toml").write_text(body)
    report = tmp_path / "rep.json"
    code, stdout, err = cli(capsys, "train", tiny_folder, "--recipe", tmp_path / "r.toml",
                            "--json", report, "--no-progress")
    assert code == 0, err
    rec = json.loads(report.read_text())["recovery"]
    assert rec["domains"]["names"] == ["tower", "noise"] and rec["domains"]["dynamic"] is True
    assert rec["domains"]["initial_weights"] == {"tower": 0.25, "noise": 0.75}
    assert [h["step"] for h in rec["domains"]["history"]] == [0, 2, 4]
    assert "| tower |" in report.with_suffix(".md").read_text()
    assert (tmp_path / "rep.train" / "domain_weights.png").is_file()
    assert "2 domains (dynamic weights)" in stdout
    bad = body.replace(str(tmp_path / "b.jsonl"), str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.toml").write_text(bad)
    code, _, err = cli(capsys, "train", tiny_folder, "--recipe", tmp_path / "bad.toml", "--json",
                       tmp_path / "bad.json", "--no-progress")
    test_cli.assert_user_error(code, err, "recovery.domains.noise: ", "missing.jsonl not found")
    assert not (tmp_path / "bad.json").exists()


def test_eight_devices_give_the_one_device_run():
    """The same domain run on 1 device and on a (data 2, fsdp 2, tensor 2) mesh of 8 simulated
    CPU devices in a subprocess: the same losses, per-domain held-out losses and weights."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    script = Path(__file__).resolve().parent / "dynamic_multi_device_run.py"
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    single = train(tiny_model(), config(**DOMAIN_MESH_RUN), windows=domain_windows(),
                   progress=False)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    multi = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
    assert multi["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(multi["losses"], single.losses, rtol=2e-5)
    for h1, h8 in zip(single.domains["history"], multi["domains"]["history"], strict=True):
        for key in ("losses", "weights"):
            np.testing.assert_allclose([h8[key][n] for n in h1[key]], list(h1[key].values()),
                                       rtol=2e-5)
    assert multi["domains"]["draws"] == single.domains["draws"]
