"""Transforms: small frozen dataclasses `model -> model`, registered by `kind` (DESIGN.md, 6).

A transform is built the same way from Python and from a recipe file:

    >>> DropLayers(layers=(12, 13))                     # Python
    >>> from_dict({"kind": "drop_layers", "layers": [12, 13]})   # a recipe's [[prune]] entry

Every transform can `check` a config before any work: it validates its settings against the
shapes it will meet and returns the config it will produce, so a whole `Pipeline` is validated
(layer indices, keep counts within group sizes, regexes that match nothing) before the first
weight is touched. `__call__(model, ctx)` then edits the model in place and returns it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Mapping

from nnxprune.errors import UserError, nearest  # noqa: F401 - nearest is re-exported
from nnxprune.models.llama import LlamaConfig

REGISTRY: dict[str, type["Transform"]] = {}


@dataclasses.dataclass
class Context:
    """What transforms share during a run: calibration data, the tokenizer, a report to fill."""

    tokenizer: Any = None
    calibration: Any = None  # a `recipes.Calibration` (dataset, nsamples, seqlen, seed)
    data_dir: Any = None
    tokens: Any = None  # calibration tokens [nsamples, seqlen]; drawn from `calibration` if None
    progress: bool = True
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def calibration_tokens(self):
        """The calibration tokens `[nsamples, seqlen]`, drawn once (None without calibration)."""
        if self.tokens is None and self.calibration is not None:
            from nnxprune.data import calibration_samples

            c = self.calibration
            drawn = calibration_samples(self.tokenizer, dataset=c.dataset, nsamples=c.nsamples,
                                        seqlen=c.seqlen, seed=c.seed, data_dir=self.data_dir)
            self.tokens = drawn.tokens
            self.log("calibration", dataset=c.dataset, nsamples=c.nsamples, seqlen=c.seqlen,
                     seed=c.seed, source=str(drawn.source))
        return self.tokens

    def required_tokens(self, who: str = "this method"):
        """`calibration_tokens()`, or one UserError naming `who` when the recipe has none."""
        tokens = self.calibration_tokens()
        if tokens is None:
            raise UserError(f"{who} needs calibration data: add a [calibration] section")
        return tokens

    def log(self, kind: str, **entry: Any) -> None:
        """Appends a record of what a transform did to `report["transforms"]`."""
        self.report.setdefault("transforms", []).append({"kind": kind, **entry})


def register(kind: str):
    """Class decorator: makes a transform available to recipes under `kind`."""

    def wrap(cls):
        if kind in REGISTRY:
            raise ValueError(f"transform kind {kind!r} registered twice")
        cls.kind = kind
        REGISTRY[kind] = cls
        return cls

    return wrap


@dataclasses.dataclass(frozen=True, kw_only=True)
class Transform:
    """Base class. Subclasses are frozen dataclasses registered with `@register(kind)`."""

    kind: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False  # whether __call__ uses ctx.calibration_tokens()

    def check(self, config: LlamaConfig) -> LlamaConfig:
        """Validates against `config` (UserError) and returns the config after the transform."""
        return config

    def __call__(self, model, ctx: Context):
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Transform):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [v.to_dict() if isinstance(v, Transform) else v for v in value]
            out[f.name] = value
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pipeline(Transform):
    """Runs transforms in order; itself a transform."""

    steps: tuple[Transform, ...] = ()
    kind: ClassVar[str] = "pipeline"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return any(step.needs_calibration for step in self.steps)

    def check(self, config: LlamaConfig) -> LlamaConfig:
        for i, step in enumerate(self.steps):
            try:
                config = step.check(config)
            except UserError as e:
                raise UserError(f"step {i} ({step.kind}): {e}") from None
        return config

    def __call__(self, model, ctx: Context):
        for step in self.steps:
            model = step(model, ctx)
        return model


REGISTRY["pipeline"] = Pipeline


# -- building from dicts (recipes) -----------------------------------------------------------------
def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Checks `value` (from TOML) against a field annotation; lists become tuples."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is Transform:
        return from_dict(value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(data: Mapping[str, Any], where: str = "transform") -> Transform:
    """Builds a registered transform from `{"kind": ..., field: value, ...}`, strictly."""
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: expected a table with a 'kind', got {data!r}")
    if "kind" not in data:
        raise UserError(f"{where}: missing 'kind' (known: {', '.join(sorted(REGISTRY))})")
    kind = data["kind"]
    if kind not in REGISTRY:
        raise UserError(f"{where}: " + nearest(str(kind), REGISTRY, "transform kind"))
    cls = REGISTRY[kind]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key == "kind":
            continue
        if key not in fields:
            raise UserError(f"{where} ({kind}): " + nearest(key, fields, "key"))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where} ({kind}): missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where} ({kind}): {e}") from None
