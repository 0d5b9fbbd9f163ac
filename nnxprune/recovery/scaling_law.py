"""Reference losses of dynamic batch loading (Sheared LLaMA: Xia et al., arXiv 2310.06694,
section 2.2 and Appendix B; reference princeton-nlp/LLM-Shearing).

Dynamic batch loading moves the domain weights toward the domains whose held-out loss is furthest
above a reference loss (`recovery.dynamic`). The paper's reference is the loss a model of the
target size would reach if trained from scratch, predicted per domain by a scaling function in
the form of Hoffmann et al. (2022) fitted on the LLaMA2 family:

    L(N, D) = E + A / N^alpha + B / D^beta      N parameters, D training tokens

(the LLaMA2 models share D = 2T tokens, so a fit over them is `E + A / N^alpha`, the data term
folded into E: `B = 0` here). The reference code ships only the predictions, one
`target_loss` per RedPajama domain (cc, github, book, stackexchange, wiki, arxiv, c4) and target
size in `llmshearing/scripts/pruning.sh` and `continue_pretrain.sh`, e.g. 2.7B:
[1.8712, 0.6883, 2.0325, 1.5353, 1.6297, 1.3560, 2.0328], 1.3B: [1.9643, 0.7459, 2.1393, 1.6117,
1.7590, 1.4449, 2.1251]; the fitted constants are in the paper's appendix, not in the code.

A recipe gives a domain's reference in one of three ways, checked before any work:

    [recovery.domains.news]
    reference_loss = 3.88          # 1. the number itself (a prediction made elsewhere, as the
                                   #    reference scripts do)
    [recovery.reference]           # 2. a scaling-law fit per domain, evaluated at the target size
    params = 9.0e7                 #    N of the target model
    tokens = 0                     #    D, needed only when a fit has B > 0
    [recovery.reference.fit.news]  #    (illustrative numbers)
    E = 1.9
    A = 410.0
    alpha = 0.34
                                   # 3. reference = "initial-loss": the model's own loss at the
                                   #    step-0 evaluation (explicit opt-in: the first update then
                                   #    does nothing and the weights drift toward the domains
                                   #    that improve least), or "reference-model": measured on an
                                   #    unpruned model by `continued_pretraining(reference_model=)`

Dynamic loading with a domain that has none of these is refused (a UserError naming the domains).
With `dynamic = false` the references only label the report; the start loss fills missing ones.

Example:
    >>> fit = ScalingFit(E=1.9, A=410.0, alpha=0.34)     # illustrative numbers
    >>> round(fit.predict(9e7), 4)                       # 1.9 + 410 / (9e7 ** 0.34)
    2.7097
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from nnxprune.errors import UserError, nearest

SOURCES = ("scaling-law", "initial-loss", "reference-model")


def _number(where: str, value: Any, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise UserError(f"{where} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalingFit:
    """One domain's `L(N, D) = E + A / N^alpha + B / D^beta` (B = 0: no data term)."""

    E: float
    A: float
    alpha: float
    B: float = 0.0
    beta: float = 0.0

    def predict(self, params: float, tokens: float = 0.0) -> float:
        loss = self.E + self.A / params ** self.alpha
        if self.B:
            loss += self.B / tokens ** self.beta
        return float(loss)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReferenceConfig:
    """`[recovery.reference]`: where the domains' reference losses come from."""

    source: str = "scaling-law"
    params: float = 0.0
    tokens: float = 0.0
    fit: dict[str, ScalingFit] = dataclasses.field(default_factory=dict)

    def predict(self, name: str) -> float | None:
        """The fit's reference loss for domain `name` at the target size (None without a fit)."""
        fit = self.fit.get(name)
        return None if fit is None else fit.predict(self.params, self.tokens)


def _fit(name: str, table: Any) -> ScalingFit:
    where = f"recovery.reference.fit.{name}"
    if isinstance(table, ScalingFit):
        table = dataclasses.asdict(table)
    if not isinstance(table, dict):
        raise UserError(f"[{where}] must be a table of E, A, alpha (and B, beta)")
    keys = [f.name for f in dataclasses.fields(ScalingFit)]
    for key in table:
        if key not in keys:
            raise UserError(f"{where}: " + nearest(key, keys, "key"))
    missing = [k for k in ("E", "A", "alpha") if k not in table]
    if missing:
        raise UserError(f"{where} needs {', '.join(missing)} (L = E + A / N^alpha + B / D^beta)")
    return ScalingFit(**{k: _number(f"{where}.{k}", v) for k, v in table.items()})


def _table(section: dict[str, Any], domains) -> ReferenceConfig:
    keys = [f.name for f in dataclasses.fields(ReferenceConfig)]
    for key in section:
        if key not in keys:
            raise UserError("recovery.reference: " + nearest(key, keys, "key"))
    source = section.get("source", "scaling-law")
    if source not in SOURCES:
        raise UserError("recovery.reference.source: " + nearest(str(source), SOURCES, "source"))
    fits = section.get("fit", {})
    if not isinstance(fits, dict):
        raise UserError("[recovery.reference.fit.NAME] must be tables, one per domain")
    for name in fits:
        if name not in domains:
            raise UserError(f"recovery.reference.fit.{name}: no such domain ("
                            + nearest(name, list(domains), "domain") + ")")
    fit = {name: _fit(name, table) for name, table in fits.items()}
    params = _number("recovery.reference.params", section.get("params", 0.0))
    tokens = _number("recovery.reference.tokens", section.get("tokens", 0.0))
    if fit and params == 0:
        raise UserError("recovery.reference.params (the target model's parameter count) is "
                        "needed to evaluate the scaling-law fit")
    if any(f.B for f in fit.values()) and tokens == 0:
        raise UserError("recovery.reference.tokens is needed: a fit has a data term (B > 0)")
    if source != "scaling-law" and fit:
        raise UserError(f"recovery.reference.source = {source!r} takes no fit")
    return ReferenceConfig(source=source, params=params, tokens=tokens, fit=fit)


def parse_reference(reference: Any, domains, dynamic: bool | None) -> ReferenceConfig | None:
    """Validates `[recovery] reference` against the domains (UserError before any work); a
    string is a `source`. Refuses dynamic loading with a domain that has no reference."""
    if reference is None:
        ref = None
    elif isinstance(reference, str):
        if reference not in SOURCES[1:]:
            raise UserError("recovery.reference: " + nearest(reference, SOURCES[1:], "reference")
                            + " (or a [recovery.reference] table with a scaling-law fit)")
        ref = ReferenceConfig(source=reference)
    elif isinstance(reference, (dict, ReferenceConfig)):
        ref = _table(reference if isinstance(reference, dict) else dataclasses.asdict(reference),
                     domains or {})
    else:
        raise UserError(f"recovery.reference must be \"initial-loss\", \"reference-model\" or a "
                        f"table, got {reference!r}")
    if not domains:
        if ref is not None:
            raise UserError("recovery.reference applies to [recovery.domains.NAME] tables")
        return None
    if dynamic and (ref is None or ref.source == "scaling-law"):
        missing = [n for n, d in domains.items()
                   if d.reference_loss is None and (ref is None or n not in ref.fit)]
        if missing:
            raise UserError(
                f"dynamic batch loading needs a reference loss for domain(s) {', '.join(missing)}: "
                f"give reference_loss, a fit in [recovery.reference.fit.NAME], or set "
                f"reference = \"initial-loss\" to use the model's own starting loss")
    return ref


def reference_losses(cfg) -> tuple[dict[str, float | None], dict[str, str]]:
    """Each domain's reference loss and where it came from ("recipe", "scaling law"; None and
    "start" when the step-0 evaluation fills it)."""
    ref = getattr(cfg, "reference", None)
    values, sources = {}, {}
    for name, spec in cfg.domains.items():
        predicted = None if ref is None else ref.predict(name)
        if spec.reference_loss is not None:
            values[name], sources[name] = float(spec.reference_loss), "recipe"
        elif predicted is not None:
            values[name], sources[name] = predicted, "scaling law"
        else:
            if ref is not None and ref.source == "reference-model":
                raise UserError(f"reference = \"reference-model\": domain {name!r} has no reference "
                                f"loss; measure it with continued_pretraining(reference_model=...)")
            values[name], sources[name] = None, "start"
    return values, sources
