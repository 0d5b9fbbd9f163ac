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
        """Validates every step against the model's shapes; returns the predicted config.

        Needs no weights: runs against a config read from a card or a folder before loading."""
        for where, section in (("eval", self.eval), ("calibration", self.calibration)):
            if section is not None and section.seqlen > config.max_position_embeddings:
                raise UserError(f"{where}.seqlen {section.seqlen} is beyond the model's context of "
                                f"{config.max_position_embeddings} tokens")
        if self.pipeline.needs_calibration and self.calibration is None:
            raise UserError("the recipe's methods need calibration data: add a [calibration] section")
        predicted = self.pipeline.check(config)
        if self.recovery is not None:  # mesh, batch, LoRA targets: before any work
            self.recovery.check(predicted)
            from nnxprune.recovery.sheared_handoff import check_recipe  # the same domains

            check_recipe(self.pipeline, self.recovery)
            if self.recovery.kind == "distill":  # the teacher is the unpruned model
                self.recovery.check_teacher(predicted, config)
        return predicted

    def check_changes(self, config: LlamaConfig) -> None:
        """UserError when the recipe would change nothing (no step removes or masks anything,
        and there is no recovery training): a "pruned" report of an unchanged model misleads."""
        if self.recovery is not None:
            return
        if not self.pipeline.steps:
            raise UserError("the recipe has no [[prune]] steps: nothing would be pruned")
        if not any(_changes(step, cfg) for step, cfg in _configs(self.pipeline.steps, config)):
            raise UserError("no step of the recipe removes or masks anything (empty layer lists, "
                            "zero sparsity or counts): nothing would be pruned")

    def to_dict(self) -> dict[str, Any]:
        return self.raw


def _configs(steps, config: LlamaConfig):
    """`(step, the config it sees)` for each step in order (nested pipelines flattened)."""
    def flat(steps):
        for step in steps:
            yield from (flat(step.steps) if isinstance(step, Pipeline) else (step,))

    for step in flat(steps):
        yield step, config
        config = step.check(config)


def _changes(step, config: LlamaConfig) -> bool:
    """Whether `step` would remove or mask anything on a model of `config`."""
    if step.kind == "fold_masks":
        return True  # folds masks the input model may carry
    if hasattr(step, "target_sparsity"):
        if getattr(step, "layer_sparsity", None) is not None:
            return any(s > 0 for s in step.layer_sparsity)
        return step.target_sparsity() > 0
    hard = dataclasses.replace(step, soft=False) if getattr(step, "soft", False) else step
    if getattr(hard, "shapes_from_scores", False):  # a global allocation (FLAP): `check` cannot
        return True  # tell the shapes, but a ratio in (0, 1) removes something
    return hard.check(config) != config


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
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise UserError(f"--set {path}: {'.'.join(parts[:depth])} is a value "
                                f"({node!r}), not a table with keys")
        last = parts[-1]
        if isinstance(node, list):
            where = ".".join(parts[:-1])
            if not last.isdigit() or int(last) >= len(node):
                raise UserError(f"--set {path}: {where} is a list of {len(node)} entries; {last!r} "
                                f"is not an index of one")
            if isinstance(node[int(last)], dict):
                raise UserError(f"--set {path}: cannot replace a whole list entry; set one of its keys")
            node[int(last)] = _parse_value(text.strip())
            continue
        if not isinstance(node, dict):
            raise UserError(f"--set {path}: {'.'.join(parts[:-1])} is a value ({node!r}), not a "
                            f"table with keys")
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
    if not isinstance(section["dataset"], str):
        raise UserError(f"eval.dataset must be a dataset name (wikitext2 or c4), got "
                        f"{section['dataset']!r}")
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


# integer fields of transforms that count something and must be positive (batch_size 0 would
# otherwise fail inside the calibration forwards, a negative count inside a shape check)
POSITIVE_FIELDS = ("batch_size", "blocksize", "count", "per_kv_group", "iterations")


def _step(data: Any, where: str):
    """`transforms.from_dict`, then the positive-count fields of the step."""
    if isinstance(data, dict) and "kind" in data and not isinstance(data["kind"], str):
        raise UserError(f"{where}: 'kind' must be a transform name, got {data['kind']!r}")
    step = from_dict(data, where)
    for name in POSITIVE_FIELDS:
        value = getattr(step, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UserError(f"{where} ({step.kind}).{name} must be a positive integer, got {value}")
    for inner, sub in enumerate(step.steps if isinstance(step, Pipeline) else ()):  # nested
        _step(sub.to_dict(), f"{where}.steps[{inner}]")
    return step


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
    pipeline = Pipeline(steps=tuple(_step(s, f"prune[{i}]") for i, s in enumerate(steps)))
    return Recipe(name=name, description=meta.get("description", ""), model=meta.get("model"),
                  paper=meta.get("paper"), pipeline=pipeline,
                  calibration=_build_calibration(_section(data, "calibration")),
                  recovery=_build_recovery(_section(data, "recovery")),
                  eval=_build_eval(_section(data, "eval")),
                  lm_eval=_build_lm_eval(_section(data, "eval")), path=path, raw=data)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Reads, overrides and validates a recipe file (UserError on any problem)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder; give a recipe .toml file (e.g. recipes/wanda.toml)")
    if not path.is_file():
        raise UserError(f"recipe file {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); TOML files are "
                        f"UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    data = apply_overrides(data, overrides)
    try:
        return parse_recipe(data, path=str(path))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
