"""Continued pretraining with dynamic batch loading (Sheared LLaMA: Xia et al., arXiv 2310.06694,
section 2.2 and Algorithm 1; reference princeton-nlp/LLM-Shearing,
`llmshearing/callbacks/dynamic_loading_callback.py` and `datasets/streaming_dataset.py`).

Every `eval_every` steps the trainer measures each domain's held-out LM cross-entropy `l[i]`;
the domain weights then move toward the domains furthest above their reference loss:

    a = softmax(log w + eta * (l - l_ref))          # eta = 1
    w = (1 - c) * a + c / K                          # c = 1e-4 (DoReMi's smoothing), K domains

This is the reference callback's `update_type = "doremi"` (`update_proportion`), which clips
nothing: a domain below its reference gets a negative excess. The paper's Algorithm 1, as we read
it (not re-checked against the PDF here), clips the excess at zero, `max(l - l_ref, 0)`, and
renormalizes without the smoothing term. We follow the code; `update_weights(..., clip=True)`
gives the clipped excess. The reference evaluates
first (`eval_first = true`) and updates after every evaluation, the first included; so do we.

Initial weights: the recipe's `weight` per domain, normalized (the reference passes the
RedPajama proportions, or the pruning stage's final ones, as `proportion`; the default here is
uniform), or, after a Sheared pruning stage that loaded the same domains dynamically, that
stage's final weights (`recovery.sheared_handoff`). The pruning stage drives this same loader
(`recovery.sheared_domains`: an update every `update_every` steps, no step-0 evaluation, as the
reference's `pruning.sh`). Reference losses (`recovery.scaling_law`): a domain's `reference_loss` from the recipe,
or the loss a scaling-law fit in the recipe predicts for the target size, as the paper and the
reference scripts' `target_loss` do. Dynamic loading without a reference for every domain is
refused unless the recipe opts in to `reference = "initial-loss"` (the model's own loss at the
step-0 evaluation: the first update then does nothing and the weights drift toward the domains
that recover least) or `"reference-model"` (the unpruned model's losses, measured by
`recovery.continued.continued_pretraining(reference_model=...)`).

The sampler draws each example's domain independently by the current weights, as the
reference's `DynamicStreamingDataset.__iter__` does (`np.random.choice(..., p=proportion)` per
sample), then takes that domain's next window from its own shuffled order (wrapping around with a
fresh shuffle; the reference stops reusing samples only within its one epoch). Draws are
deterministic from the seed and the batch index, and the state (weights, positions, references,
history) is JSON, saved with the trainer's checkpoints. With `dynamic = false` the weights stay
at their initial values, the comparison the paper makes.

Example:
    >>> loader = DomainLoader.build(cfg, windows=None, tokenizer=tok, data_dir=folder)
    >>> batch = next(loader)                       # int32 [grad_accum, micro_batch, seqlen]
    >>> row = loader.evaluate(session.evaluate, step=0)   # per-domain losses; weights updated
    >>> loader.report()["history"][-1]["weights"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nnxprune import data as data_lib
from nnxprune.data.domains import load_domain_windows
from nnxprune.errors import UserError
from nnxprune.io import atomic
from nnxprune.recovery.scaling_law import reference_losses

ETA = 1.0
SMOOTHING = 1e-4  # c in (1 - c) w + c / K, following DoReMi as the reference does
WEIGHTS_FILE = "domains.json"
WEIGHTS_PLOT = "domain_weights.png"


def normalize(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UserError(f"domain weights must be >= 0 and sum to more than 0, got {list(w)}")
    return w / w.sum()


def update_weights(weights: Sequence[float], losses: Sequence[float], reference: Sequence[float],
                   *, eta: float = ETA, smoothing: float = SMOOTHING,
                   clip: bool = False) -> np.ndarray:
    """One dynamic-batch-loading update (module docstring): float64 weights summing to 1."""
    w = normalize(weights)
    excess = np.asarray(losses, np.float64) - np.asarray(reference, np.float64)
    if clip:
        excess = np.maximum(excess, 0.0)
    with np.errstate(divide="ignore"):  # a weight of 0 stays 0 before the smoothing
        logits = np.log(w) + eta * excess
    a = np.exp(logits - np.max(logits))
    a /= a.sum()
    out = (1.0 - smoothing) * a + smoothing / len(w)
    return out / out.sum()


class DomainSampler:
    """Endless `[grad_accum, batch_size / grad_accum, seqlen]` int32 batches whose examples come
    from the domains in proportion to `weights` (each example's domain drawn independently)."""

    def __init__(self, train: Sequence[np.ndarray], weights: Sequence[float], *, batch_size: int,
                 grad_accum: int, seed: int):
        if len(train) != len(weights):
            raise ValueError("one weight per domain")
        self.train = [np.asarray(t, np.int32) for t in train]
        self.weights = normalize(weights)
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.batches = 0
        self.cursors = [0] * len(self.train)

    def _order(self, d: int, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, d, epoch)).permutation(len(self.train[d]))

    def _take(self, d: int) -> np.ndarray:
        epoch, i = divmod(self.cursors[d], len(self.train[d]))
        self.cursors[d] += 1
        return self.train[d][self._order(d, epoch)[i]]

    def draw_domains(self) -> np.ndarray:
        """The domains of the next batch's examples (advances nothing)."""
        rng = np.random.default_rng((self.seed, 1 << 20, self.batches))
        return rng.choice(len(self.train), size=self.batch_size, p=self.weights)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(batch, the domain of each example)."""
        domains = self.draw_domains()
        rows = np.stack([self._take(int(d)) for d in domains])
        self.batches += 1
        return rows.reshape(self.grad_accum, self.batch_size // self.grad_accum, -1), domains

    def get_state(self) -> dict[str, Any]:
        return {"batches": self.batches, "cursors": list(self.cursors),
                "weights": [float(w) for w in self.weights]}

    def set_state(self, state: dict[str, Any]) -> None:
        self.batches, self.cursors = int(state["batches"]), [int(c) for c in state["cursors"]]
        self.weights = normalize(state["weights"])


class DomainLoader:
    """A run's data in domain mode: the training iterator (a `DomainSampler`) and the per-domain
    held-out evaluation that updates its weights. The trainer uses it as its iterator (with
    `get_state` / `set_state` for checkpoints) and as its held-out set (`evaluate`)."""

    def __init__(self, cfg, windows: dict[str, data_lib.TokenWindows]):
        self.names = list(cfg.domains)
        missing = [n for n in self.names if n not in windows]
        if missing:
            raise UserError(f"no windows for the domain(s) {', '.join(missing)}")
        for name in self.names:
            if windows[name].train.shape[1] != cfg.seqlen:
                raise UserError(f"domain {name!r} windows have {windows[name].train.shape[1]} "
                                f"tokens, recovery.seqlen is {cfg.seqlen}")
        self.windows = {n: windows[n] for n in self.names}
        self.dynamic = bool(cfg.dynamic)
        self.initial = normalize([cfg.domains[n].weight for n in self.names])
        self.sampler = DomainSampler([self.windows[n].train for n in self.names], self.initial,
                                     batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                     seed=cfg.seed)
        self.heldout = {n: data_lib.heldout_batches(w.heldout, cfg.micro_batch, cfg.eval_batches)
                        for n, w in self.windows.items()}
        for name, batches in self.heldout.items():
            if not batches:
                raise UserError(f"domain {name!r} has no held-out batch of {cfg.micro_batch} "
                                f"windows")
        self.reference, self.reference_from = reference_losses(cfg)  # recipe, fit or start
        self.draws = [0] * len(self.names)
        self.history: list[dict[str, Any]] = []

    @classmethod
    def build(cls, cfg, windows, tokenizer, data_dir) -> "DomainLoader":
        """From pre-tokenized `windows` ({domain: TokenWindows}) or the recipe's sources."""
        if windows is None:
            if tokenizer is None:
                raise UserError("recovery needs a tokenizer (or pre-tokenized domain windows)")
            windows = load_domain_windows(
                cfg.domains, tokenizer, seqlen=cfg.seqlen, train_windows=cfg.steps * cfg.batch_size,
                heldout_windows=cfg.eval_batches * cfg.micro_batch, data_dir=data_dir)
        if not isinstance(windows, dict):
            raise UserError("recovery.domains needs windows per domain ({name: TokenWindows})")
        return cls(cfg, windows)

    # -- the iterator the trainer steps through ---------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        batch, domains = self.sampler.next_batch()
        for d in domains:
            self.draws[int(d)] += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.get_state(), "draws": list(self.draws),
                "reference": dict(self.reference), "reference_from": dict(self.reference_from),
                "history": list(self.history)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.sampler.set_state(state["sampler"])
        self.draws = [int(x) for x in state["draws"]]
        self.reference, self.reference_from = state["reference"], state["reference_from"]
        self.history = list(state["history"])

    # -- evaluation and the weight update ---------------------------------------------------
    def fill_references(self, evaluate_fn: Callable[[list], dict[str, float]]) -> dict[str, float]:
        """Measures (`evaluate_fn(batches)`) the held-out loss of every domain whose reference is
        still missing and makes it the reference, without touching the weights or the history
        (Sheared's pruning stage with `reference = "initial-loss"`: it evaluates before its first
        step, where the reference's pruning has no step-0 evaluation). Returns what it measured."""
        missing = [n for n in self.names if self.reference[n] is None]
        measured = {n: float(evaluate_fn(self.heldout[n])["ce"]) for n in missing}
        self.reference.update(measured)
        return measured

    def evaluate(self, evaluate_fn: Callable[[list], dict[str, float]], step: int) -> dict:
        """Each domain's held-out metrics by `evaluate_fn(batches)`; fills missing reference
        losses (at the first evaluation), updates the weights when dynamic, records the history.
        Returns the metrics row: `loss` / `ce` averaged over domains, `ce.NAME`, `weight.NAME`
        (the weights from this step on) and `mean_excess`."""
        per = {n: evaluate_fn(self.heldout[n]) for n in self.names}
        losses = np.array([per[n]["ce"] for n in self.names])
        for n, loss in zip(self.names, losses):
            if self.reference[n] is None:
                self.reference[n] = float(loss)
        ref = np.array([self.reference[n] for n in self.names])
        if self.dynamic:
            self.sampler.weights = update_weights(self.sampler.weights, losses, ref)
        excess = losses - ref
        weights = self.sampler.weights
        self.history.append({
            "step": step, "losses": dict(zip(self.names, map(float, losses))),
            "excess": dict(zip(self.names, map(float, excess))),
            "weights": dict(zip(self.names, map(float, weights))),
            "mean_excess": float(excess.mean()), "draws": dict(zip(self.names, self.draws))})
        row = {"loss": float(np.mean([per[n]["loss"] for n in self.names])),
               "ce": float(losses.mean()), "mean_excess": float(excess.mean())}
        row.update({f"ce.{n}": float(v) for n, v in zip(self.names, losses)})
        row.update({f"weight.{n}": float(v) for n, v in zip(self.names, weights)})
        return row

    # -- what the run reports ---------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"domains": {n: w.describe() for n, w in self.windows.items()},
                "seqlen": int(next(iter(self.windows.values())).train.shape[1])}

    def report(self) -> dict[str, Any]:
        """Names, initial weights, references (and where they came from), the history of
        per-domain losses, excess losses and weights, and the examples drawn per domain."""
        last = self.history[-1] if self.history else None
        return {"names": self.names, "dynamic": self.dynamic,
                "initial_weights": dict(zip(self.names, map(float, self.initial))),
                "reference_losses": dict(self.reference), "reference_from": dict(self.reference_from),
                "update": {"eta": ETA, "smoothing": SMOOTHING, "clip": False},
                "draws": dict(zip(self.names, self.draws)), "history": self.history,
                "final_losses": last["losses"] if last else None,
                "final_excess": last["excess"] if last else None,
                "final_mean_excess": last["mean_excess"] if last else None}

    def finish(self, log_dir) -> dict[str, Any]:
        """The report, also written to `log_dir` as domains.json and domain_weights.png."""
        report = self.report()
        if log_dir is not None and self.history:
            atomic.write_json(Path(log_dir) / WEIGHTS_FILE, report)
            plot_history(report, Path(log_dir) / WEIGHTS_PLOT)
        return report


def plot_history(report: dict[str, Any], png: Path) -> None:
    """Domain weights (left) and held-out excess losses (right) over the steps, as a PNG."""
    from matplotlib.figure import Figure

    steps = [h["step"] for h in report["history"]]
    fig = Figure(figsize=(10, 4), layout="constrained")
    a, b = fig.subplots(1, 2)
    for name in report["names"]:
        a.step(steps, [h["weights"][name] for h in report["history"]], where="post", label=name)
        b.plot(steps, [h["excess"][name] for h in report["history"]], "o-", label=name)
    a.set_title("domain weights" + ("" if report["dynamic"] else " (fixed)"))
    b.set_title("held-out loss - reference loss")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    atomic.write_figure(png, fig)
