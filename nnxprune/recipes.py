"""Recipe files: a pipeline of transforms plus calibration, recovery and evaluation settings.

A recipe is TOML (read with `tomllib`) and maps one to one onto the objects a Python user builds:

    [recipe]
    name = "surgery-demo"
    description = "..."
    model = "smollm2-135m"             # default MODEL; --model overrides

    [[prune]]                          # each entry is a registered transform: kind + its fields
    kind = "drop_layers"
    layers = [20, 21]

    [calibration]                      # used by calibrated methods
    dataset = "c4"
    nsamples = 128
    seqlen = 2048
    seed = 0

    [recovery]                         # training after pruning (nnxprune.recovery.config)
    kind = "distill"                   # "distill" | "lora" | "pretrain"
    steps = 200
    [recovery.distill]
    temperature = 1.0

    [eval]                             # a perplexity protocol (nnxprune.evaluate.protocol)
    dataset = "wikitext2"
    seqlen = 2048

Everything is validated before any work: an unknown section, key or kind is an error naming the
nearest valid one, values are type- and range-checked, and `Recipe.check(config)` runs every
transform's shape check against the model (layer indices, keep counts within group sizes).
`--set section.key=value` overrides any value (`prune.1.fraction=0.3` indexes the list); the
value is parsed as TOML, so `--set eval.seqlen=1024` is an integer.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping, Sequence

from nnxprune.errors import UserError
from nnxprune.evaluate.protocol import PerplexityProtocol
from nnxprune.models.llama import LlamaConfig
from nnxprune.recovery.config import RecoveryConfig
from nnxprune.transforms import Pipeline, from_dict
from nnxprune.transforms.base import nearest

SECTIONS = ("recipe", "prune", "calibration", "recovery", "eval")
RECIPE_KEYS = ("name", "description", "model", "paper")
CALIBRATION_DATASETS = ("c4", "wikitext2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """Calibration data: `nsamples` windows of `seqlen` tokens drawn with `seed` from `dataset`
    (a name in CALIBRATION_DATASETS or a local text / JSONL / parquet file)."""

    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        for name in ("nsamples", "seqlen", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"calibration.{name} must be an integer, got {value!r}")
        if self.nsamples < 1:
            raise UserError(f"calibration.nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise UserError(f"calibration.seqlen must be >= 2, got {self.seqlen}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise UserError(f"calibration.dataset must be a name or a file, got {self.dataset!r}")
        if self.dataset not in CALIBRATION_DATASETS and not Path(self.dataset).suffix:
            raise UserError("calibration.dataset: " + nearest(self.dataset, CALIBRATION_DATASETS,
                                                              "dataset") + " (or a file path)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str
    description: str = ""
    model: str | None = None
    paper: str | None = None
    pipeline: Pipeline
    calibration: Calibration | None = None
    recovery: RecoveryConfig | None = None
    eval: PerplexityProtocol | None = None
    lm_eval: dict[str, Any] | None = None  # [eval.lm_eval]: lm-eval tasks run dense and final
    path: str | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def check(self, config: LlamaConfig) -> LlamaConfig:
        """Validates every step against the model's shapes; returns the predicted config."""
        if self.eval is not None and self.eval.seqlen > config.max_position_embeddings:
            raise UserError(f"eval.seqlen {self.eval.seqlen} is beyond the model's context of "
                            f"{config.max_position_embeddings} tokens")
        predicted = self.pipeline.check(config)
        if self.recovery is not None:  # mesh, batch, LoRA targets: before any work
            self.recovery.check(predicted)
        return predicted

    def to_dict(self) -> dict[str, Any]:
        return self.raw


# -- overrides -------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies `section.key=value` overrides (list entries by index) to the parsed TOML."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects section.key=value, got {item!r}")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise UserError(f"--set expects section.key=value, got {item!r}")
        if parts[0] not in SECTIONS:
            raise UserError(f"--set {path}: " + nearest(parts[0], SECTIONS, "section"))
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {path}: {'.'.join(parts[:depth])} has {len(node)} "
                                    f"entries; {part!r} is not an index of one")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            raise UserError(f"--set {path}: cannot replace a whole list entry; set one of its keys")
        node[last] = _parse_value(text.strip())
    return data


# -- loading ---------------------------------------------------------------------------------------
def _section(data: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(f"[{name}] must be a table")
    return dict(value)


def _build_calibration(section: dict[str, Any] | None) -> Calibration | None:
    if section is None:
        return None
    fields = {f.name for f in dataclasses.fields(Calibration)}
    for key in section:
        if key not in fields:
            raise UserError("calibration: " + nearest(key, fields, "key"))
    return Calibration(**section)


LM_EVAL_KEYS = ("tasks", "include_path", "limit", "num_fewshot", "batch_size", "max_length")


def _build_eval(section: dict[str, Any] | None) -> PerplexityProtocol | None:
    if section is None:
        return None
    section = {k: v for k, v in section.items() if k != "lm_eval"}
    if not section:
        return None  # only [eval.lm_eval]
    if "dataset" not in section:
        raise UserError("[eval] needs a 'dataset' (wikitext2 or c4)")
    try:
        return PerplexityProtocol.from_dict(section)
    except UserError as e:
        raise UserError(f"eval: {e}") from None


def _build_lm_eval(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """`[eval.lm_eval]`: lm-eval tasks (a list of names), optional include_path (local task
    YAMLs), limit, num_fewshot, batch_size, max_length."""
    if section is None or "lm_eval" not in section:
        return None
    table = section["lm_eval"]
    if not isinstance(table, dict):
        raise UserError("[eval.lm_eval] must be a table")
    for key in table:
        if key not in LM_EVAL_KEYS:
            raise UserError("eval.lm_eval: " + nearest(key, LM_EVAL_KEYS, "key"))
    tasks = table.get("tasks")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise UserError("eval.lm_eval.tasks must be a non-empty list of task names")
    for key in ("num_fewshot", "batch_size", "max_length"):
        v = table.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "num_fewshot" else 1)):
            raise UserError(f"eval.lm_eval.{key} must be a positive integer, got {v!r}")
    limit = table.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise UserError(f"eval.lm_eval.limit must be > 0 (a count, or a fraction below 1), got {limit!r}")
    return {**table, "tasks": tasks}


def _build_recovery(section: dict[str, Any] | None) -> RecoveryConfig | None:
    if section is None:
        return None
    return RecoveryConfig.from_dict(section)  # strict: unknown keys name the nearest valid one


def parse_recipe(data: dict[str, Any], *, path: str | None = None) -> Recipe:
    """Builds and validates a `Recipe` from parsed TOML."""
    for key in data:
        if key not in SECTIONS:
            raise UserError(nearest(key, SECTIONS, "recipe section"))
    meta = _section(data, "recipe") or {}
    for key in meta:
        if key not in RECIPE_KEYS:
            raise UserError("recipe: " + nearest(key, RECIPE_KEYS, "key"))
    name = meta.get("name") or (Path(path).stem if path else "recipe")
    steps = data.get("prune", [])
    if not isinstance(steps, list):
        raise UserError("[[prune]] must be a list of tables, each with a 'kind'")
    pipeline = Pipeline(steps=tuple(from_dict(s, f"prune[{i}]") for i, s in enumerate(steps)))
    return Recipe(name=name, description=meta.get("description", ""), model=meta.get("model"),
                  paper=meta.get("paper"), pipeline=pipeline,
                  calibration=_build_calibration(_section(data, "calibration")),
                  recovery=_build_recovery(_section(data, "recovery")),
                  eval=_build_eval(_section(data, "eval")),
                  lm_eval=_build_lm_eval(_section(data, "eval")), path=path, raw=data)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Reads, overrides and validates a recipe file (UserError on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    data = apply_overrides(data, overrides)
    try:
        return parse_recipe(data, path=str(path))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
