"""No default depends on the CPU model (DESIGN.md principle 14).

The package, its benchmarks and its tests compile every program with XLA's default CPU pipeline:
no compiler options on `.compile(...)`, no `xla_*` flag set from Python, no `jax.config` switch of
the compiler. An experimental option (oneDNN matmuls, `xla_cpu_use_onednn`) once ran by default
and killed the process with SIGILL on an AVX-512 EPYC; these checks read the source with `ast`,
so they hold on every CPU, including the ones the suite never ran on.

The scorer test runs `nnxprune eval`'s program in a child process and asserts on its exit status:
whatever a CPU does with it, a crash fails this one test and not the whole pytest process.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [REPO / "nnxprune", REPO / "benchmarks", REPO / "tests"]
# jax.config switches that change code generation (the multi-process collectives and the
# platform choice are not compiler options)
ALLOWED_CONFIG = {"jax_cpu_collectives_implementation", "jax_platforms", "jax_enable_x64"}


def _python_files():
    for root in SOURCES:
        yield from sorted(root.rglob("*.py"))


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "compile" and (node.args or node.keywords) and not (
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "re"):
                found.append(f"{where}: .compile() with compiler options")
            if (node.func.attr == "update" and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and node.args[0].value not in ALLOWED_CONFIG):
                found.append(f"{where}: jax.config.update({node.args[0].value!r})")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value
            if "xla_cpu_use_onednn" in value or "onednn_fusion" in value:
                found.append(f"{where}: experimental XLA option {value!r}")
            if value.startswith("--xla_") and "xla_force_host_platform_device_count" not in value:
                found.append(f"{where}: XLA flag {value!r}")
    return found


def test_no_compiler_options_anywhere():
    offences = [o for path in _python_files() if path.name != Path(__file__).name
                for o in _offences(path)]
    assert not offences, "\n".join(offences)


def test_the_check_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        import re
        re.compile("x")                       # fine: a regular expression
        lowered.compile()                     # fine: XLA's defaults
        lowered.compile({"xla_cpu_use_onednn": True})
        jax.config.update("jax_default_matmul_precision", "bfloat16")
        os.environ["XLA_FLAGS"] = "--xla_cpu_enable_fast_math=true"
    """))
    offences = [o.split(": ", 1)[1] for o in _offences_at(bad)]
    assert offences == [".compile() with compiler options",
                        "experimental XLA option 'xla_cpu_use_onednn'",
                        "jax.config.update('jax_default_matmul_precision')",
                        "XLA flag '--xla_cpu_enable_fast_math=true'"]


def _offences_at(path: Path) -> list[str]:
    global REPO
    saved, REPO = REPO, path.parent
    try:
        return sorted(_offences(path), key=lambda o: int(o.split(":")[1]))
    finally:
        REPO = saved


SCORER = """
import numpy as np
from flax import nnx
from nnxprune.evaluate.perplexity import score_windows
from nnxprune.evaluate.protocol import protocol_for
from nnxprune.models.llama import Llama, LlamaConfig

config = LlamaConfig.uniform(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=128, head_dim=16)
model = Llama(config, rngs=nnx.Rngs(0))
windows = np.random.default_rng(0).integers(0, 256, (3, 128)).astype(np.int32)
result = score_windows(model, windows, protocol_for("wikitext2", seqlen=128, batch_size=2),
                       progress=False)
print("ppl", result.ppl)
"""


def test_scorer_runs_in_a_child_process():
    """The evaluation program, compiled and run as `nnxprune eval` does, in a child process: a CPU
    on which it dies (SIGILL, as oneDNN did) fails here with the child's output, not the suite."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", SCORER], capture_output=True, text=True,
                         timeout=300, env=env, cwd=REPO)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    ppl = float(run.stdout.split("ppl", 1)[1])
    # a random 256-token model predicts near uniformly: ppl within a factor 2 of the vocabulary
    assert 128 < ppl < 512
