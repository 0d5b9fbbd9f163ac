"""Tests for the data sources: the data folder, evaluation rows from it or the hub."""

from __future__ import annotations

import pytest

from nnxprune.data import DATA_DIR_ENV, load_rows, resolve_data_dir, sources
from nnxprune.errors import UserError

# ---------------------------------------------------------------- data dir and loaders


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) is None
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(env_dir))
    assert resolve_data_dir(None) == env_dir
    assert resolve_data_dir(tmp_path) == tmp_path  # the explicit argument wins


def test_resolve_data_dir_missing(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=f"{missing}.*--data-dir.*does not exist"):
        resolve_data_dir(missing)
    monkeypatch.setenv(DATA_DIR_ENV, str(missing))
    with pytest.raises(UserError, match=f"{missing}.*{DATA_DIR_ENV}.*does not exist"):
        resolve_data_dir(None)


def test_load_rows_missing_file(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "wiki.test.raw")):
        load_rows("wikitext2", "test", tmp_path)
    with pytest.raises(UserError, match="c4_validation_2k.parquet"):
        load_rows("c4", "validation", tmp_path)
    with pytest.raises(UserError, match="no data for c4/test"):
        load_rows("c4", "test", tmp_path)


def test_load_rows_wikitext_layout(tmp_path):
    (tmp_path / "wiki.test.raw").write_bytes(b" \n = Title = \n \n Text .\n")
    assert load_rows("wikitext2", "test", tmp_path) == ["", " = Title = \n", "", " Text .\n"]


def test_hub_unreachable_fails_fast(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    with pytest.raises(UserError, match=f"--data-dir or set {DATA_DIR_ENV}") as e:
        load_rows("wikitext2", "test", None)
    assert "\n" not in str(e.value)


def test_hub_error_becomes_user_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def boom(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub\nmore detail")

    monkeypatch.setattr(sources, "_hub_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(UserError, match="ConnectionError: Couldn't reach") as e:
        load_rows("c4", "validation", None)
    assert "\n" not in str(e.value) and "c4_validation_2k.parquet" in str(e.value)


def test_hub_path_arguments(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["a\n", "", None]}

    monkeypatch.setattr(sources, "_hub_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rows("wikitext2", "test", None) == ["a\n", "", ""]
    load_rows("c4", "validation", None)
    assert calls == [
        (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
        (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                           "split": "validation"}),
    ]
