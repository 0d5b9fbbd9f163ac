"""Fuzzing the recipe loader: every input validates or raises UserError, never another exception.

A seeded generator builds recipes from every registered transform's fields (and the calibration,
recovery, eval and lm-eval keys), then mutates them: values of the wrong type or range (negative,
huge, NaN, infinite, empty, nested lists, tables), misspelled or unknown keys and kinds, missing
required keys, sections of the wrong shape, `--set` overrides into any path. Each example is written
as TOML text and read back through `load_recipe`, then checked against a small model config
(`Recipe.check`, `Recipe.check_changes`), as `nnxprune prune` does before any work.
"""

import dataclasses
import json
import math
import random
import typing

import pytest

from nnxprune.errors import UserError
from nnxprune.evaluate.protocol import PerplexityProtocol
from nnxprune.models.llama import LayerShape, LlamaConfig
from nnxprune.recipes import CALIBRATION_DATASETS, LM_EVAL_KEYS, RECIPE_KEYS, SECTIONS, load_recipe
from nnxprune.recovery.config import DistillConfig, LoRAConfig, MeshConfig, RecoveryConfig
from nnxprune.transforms.base import REGISTRY

EXAMPLES = 2400
CONFIGS = [
    LlamaConfig.uniform(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=32, head_dim=4, max_position_embeddings=64),
    LlamaConfig(vocab_size=64, hidden_size=24, head_dim=4, max_position_embeddings=128,
                layers=(LayerShape(num_heads=6, num_kv_heads=3, intermediate_size=48),
                        LayerShape(num_heads=4, num_kv_heads=1, intermediate_size=40),
                        LayerShape(num_heads=2, num_kv_heads=2, intermediate_size=8))),
]
SCALARS = [0, 1, 2, 3, -1, -7, 7, 64, 10**6, 2**63 - 1, -(2**63), 0.0, 0.5, 0.25, -0.5, 1.0, 1.5,
           0.999999, 1e-12, 1e308, math.nan, math.inf, -math.inf, True, False, "", " ", "2:4",
           "4:4", "0:4", "3:2", "2:3", "a:b", "2:4:8", ".*", "mlp", "[", "(", "layers\\.0\\.",
           "weight_norm", "nope", "wanda", "sparsegpt", "c4", "wikitext2", "missing.txt", "x",
           "float32", "bfloat16", "distill", "lora", "pretrain", "\u00e9\u00e8", "\x00"]


def value(rng: random.Random, depth: int = 0):
    """A random TOML value: mostly scalars, sometimes lists and tables."""
    r = rng.random()
    if r < 0.7 or depth > 1:
        return rng.choice(SCALARS)
    if r < 0.9:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["kind", "x", "sparsity", "layers"]): value(rng, depth + 1)
            for _ in range(rng.randint(0, 2))}


def fields_of(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def typed_value(rng: random.Random, annotation):
    """A plausible value for a field (so that many examples get past the type checks)."""
    text = str(annotation)
    if "tuple" in text:
        inner = float if "float" in text else int
        return [inner(rng.choice([0, 1, 2, 0.5, 0.25, 3])) for _ in range(rng.randint(0, 4))]
    if "bool" in text:
        return rng.choice([True, False])
    if "float" in text:
        return rng.choice([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    if "int" in text:
        return rng.choice([0, 1, 2, 3, 4, 8, 16])
    return rng.choice(["2:4", "1:4", ".*", "mlp", "weight_norm", "wanda", "activation"])


GOOD_STEPS = [{"kind": "drop_layers", "layers": [1]}, {"kind": "magnitude", "sparsity": 0.5},
              {"kind": "magnitude", "pattern": "2:4"}, {"kind": "shrink_mlp", "fraction": 0.25},
              {"kind": "remove_kv_groups", "count": 1, "layers": [0]},
              {"kind": "remove_query_heads", "per_kv_group": 1, "layers": [0]},
              {"kind": "shrink_hidden", "count": 4}, {"kind": "wanda", "sparsity": 0.5},
              {"kind": "sparsegpt", "pattern": "2:4"}, {"kind": "owl", "sparsity": 0.6},
              {"kind": "sparsellm", "sparsity": 0.5}, {"kind": "fold_masks"}]


def step(rng: random.Random) -> dict:
    if rng.random() < 0.6:  # a valid step, sometimes with one more plausible field
        out = dict(rng.choice(GOOD_STEPS))
        if rng.random() < 0.3:
            cls = REGISTRY[out["kind"]]
            name = rng.choice(fields_of(cls))
            out[name] = typed_value(rng, typing.get_type_hints(cls)[name])
        return out
    kind = rng.choice(sorted(k for k in REGISTRY if k != "pipeline"))
    cls = REGISTRY[kind]
    hints = typing.get_type_hints(cls)
    out = {"kind": kind}
    for name in fields_of(cls):
        if rng.random() < 0.5:
            out[name] = typed_value(rng, hints[name])
    return out


def section(rng: random.Random, keys: list[str], plausible: dict | None = None) -> dict:
    """Some of `keys`: plausible values where given (and on a coin flip), else random ones."""
    out = {}
    for k in rng.sample(keys, rng.randint(0, min(3, len(keys)))):
        good = (plausible or {}).get(k)
        out[k] = rng.choice(good) if good and rng.random() < 0.8 else value(rng)
    return out


PLAUSIBLE = {"nsamples": [1, 2, 4], "seed": [0, 1], "steps": [1, 5], "lr": [1e-4, 0.01],
             "grad_accum": [1, 2], "warmup_steps": [0, 2], "eval_every": [0, 10],
             "eval_batches": [0, 1], "temperature": [1.0, 2.0], "kd_weight": [0.0, 1.0],
             "ce_weight": [0.0, 0.5], "rank": [2, 8], "alpha": [4.0, 16.0], "targets": ["mlp", ".*"],
             "data": [-1, 1], "fsdp": [1], "tensor": [1], "max_windows": [1, 4], "batch_size": [1, 2],
             "split": ["test", "validation"], "name": ["r"], "description": ["d"], "tasks": [["t"]],
             "limit": [1, 0.5], "num_fewshot": [0, 1], "hidden_layers": [[0], []],
             "hidden_weight": [0.0, 1.0]}


def recipe(rng: random.Random) -> dict:
    data: dict = {"prune": [step(rng) for _ in range(rng.randint(0, 2))]}
    if rng.random() < 0.3:
        data["recipe"] = section(rng, list(RECIPE_KEYS), PLAUSIBLE)
    if rng.random() < 0.6:
        data["calibration"] = {"dataset": rng.choice(CALIBRATION_DATASETS), "nsamples": 2,
                               "seqlen": rng.choice([8, 16, 100, 4096]),
                               **section(rng, ["nsamples", "seed"], PLAUSIBLE)}
    if rng.random() < 0.3:
        rec = {"kind": rng.choice(["distill", "lora", "pretrain"]), "dataset": "c4", "seqlen": 16,
               "batch_size": rng.choice([1, 2, 4]),
               **section(rng, [f for f in fields_of(RecoveryConfig) if f not in ("distill", "lora", "mesh")],
                         PLAUSIBLE)}
        for name, cls in (("distill", DistillConfig), ("lora", LoRAConfig), ("mesh", MeshConfig)):
            if rng.random() < 0.3:
                rec[name] = section(rng, fields_of(cls), PLAUSIBLE)
        data["recovery"] = rec
    if rng.random() < 0.3:
        data["eval"] = {"dataset": rng.choice(["wikitext2", "c4", "x"]), "seqlen": rng.choice([16, 1024]),
                        **section(rng, fields_of(PerplexityProtocol), PLAUSIBLE)}
        if rng.random() < 0.3:
            data["eval"]["lm_eval"] = section(rng, list(LM_EVAL_KEYS), PLAUSIBLE)
    return data


def mutate(rng: random.Random, data: dict) -> dict:
    """One to three random edits of a recipe's keys, values and shape."""
    for _ in range(rng.randint(1, 3)):
        tables = [data] + [t for t in data.values() if isinstance(t, dict)]
        tables += [s for s in data.get("prune", []) if isinstance(s, dict)] if isinstance(
            data.get("prune"), list) else []
        table = rng.choice(tables)
        op = rng.random()
        keys = list(table)
        if op < 0.45 and keys:
            table[rng.choice(keys)] = value(rng)  # a value of any type
        elif op < 0.6:
            name = rng.choice(keys) if keys else "kind"
            table[name[:-1] + "x" if name else "x"] = value(rng)  # a misspelled / unknown key
        elif op < 0.7 and keys:
            del table[rng.choice(keys)]  # a missing key (kind, required fields)
        elif op < 0.8:
            table["kind"] = rng.choice(list(REGISTRY) + ["drop_layer", "", "Wanda"])
        elif op < 0.9:
            data[rng.choice(list(SECTIONS) + ["prun", "evals"])] = value(rng)  # a section of any shape
        else:
            name = rng.choice(sorted(REGISTRY))
            table.update({f: value(rng) for f in fields_of(REGISTRY[name])[:2]})
    return data


def toml(data) -> str:
    """TOML text of `data`: every section as an inline table or an array of inline tables."""
    def render(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(render(x) for x in v) + "]"
        return "{" + ", ".join(f"{json.dumps(k)} = {render(x)}" for k, x in v.items()) + "}"

    return "".join(f"{json.dumps(k)} = {render(v)}\n" for k, v in data.items())


def overrides(rng: random.Random) -> list[str]:
    paths = ["recipe.name", "recipe.name.x", "prune.0.sparsity", "prune.0", "prune.9.kind",
             "prune.x.kind", "prune.0.layers.0", "prune.0.layers.x", "calibration.seqlen",
             "eval.seqlen", "recovery.mesh.data", "recovery.distill.x.y", "evals.x", "eval", "x"]
    return [f"{rng.choice(paths)}={rng.choice(['1', '-1', '0.5', 'nan', '[1, 2]', '{a = 1}', 'abc', ''])}"
            for _ in range(rng.randint(0, 2))] + ([rng.choice(["noequals", "=1", "a.=1"])]
                                                  if rng.random() < 0.05 else [])


def test_recipe_loader_fuzz(tmp_path):
    rng = random.Random(20)
    outcomes = {"valid": 0, "user_error": 0}
    path = tmp_path / "r.toml"
    for i in range(EXAMPLES):
        data = recipe(rng)
        if rng.random() < 0.5:
            data = mutate(rng, data)
        path.write_text(toml(data), encoding="utf-8")
        sets = overrides(rng) if rng.random() < 0.2 else []
        try:
            loaded = load_recipe(path, sets)
            config = rng.choice(CONFIGS)
            loaded.check(config)
            loaded.check_changes(config)
            outcomes["valid"] += 1
        except UserError as e:
            assert str(e) and "\n" not in str(e).strip(), f"example {i}: multi-line message {e!r}"
            outcomes["user_error"] += 1
        except Exception as e:  # noqa: BLE001 - the property under test
            pytest.fail(f"example {i}: {type(e).__name__}: {e}\nrecipe:\n{toml(data)}\n--set {sets}")
    assert sum(outcomes.values()) == EXAMPLES
    assert outcomes["valid"] >= 50, outcomes  # the generator also reaches valid recipes (132 of 2400)
