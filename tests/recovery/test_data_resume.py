"""The recovery trainer on streamed data (`[recovery.stream]`, `data.grain_stream`): a run stopped
after k steps and resumed from its Orbax checkpoint trains on exactly the batches, and so reaches
exactly the losses, of an uninterrupted run; the in-memory path is untouched by the option."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from recovery_common import config, tiny_model

from nnxprune.data import grain_stream, sources
from nnxprune.errors import UserError
from nnxprune.recovery import train


class CharTokenizer:
    """One id per character (1..127; the tiny model's vocabulary is 128), EOS 0."""

    eos_token_id = 0

    def __call__(self, text, verbose=False, add_special_tokens=True):
        return {"input_ids": [ord(c) % 127 + 1 for c in text]}


@pytest.fixture()
def wiki_txt(tmp_path) -> Path:
    """WikiText-2 test (the data folder's raw file) as a .txt of documents, one per line."""
    folder = os.environ.get(sources.DATA_DIR_ENV)
    raw = Path(folder or "") / "wiki.test.raw"
    if not folder or not raw.is_file():
        pytest.skip(f"{sources.DATA_DIR_ENV} does not name the data folder with wiki.test.raw")
    link = tmp_path / "wiki.txt"
    link.symlink_to(raw)
    return link


@pytest.fixture()
def batches(monkeypatch) -> list:
    """Every batch a `TrainStream` hands out, in order."""
    seen = []
    original = grain_stream.TrainStream.__next__

    def recording(self):
        batch = original(self)
        seen.append(np.asarray(batch))
        return batch
    monkeypatch.setattr(grain_stream.TrainStream, "__next__", recording)
    return seen


RUN = dict(steps=6, batch_size=4, grad_accum=2, checkpoint_every=2, keep_checkpoints=2,
           eval_every=3, eval_batches=1, stream={})


def test_stopped_and_resumed_run_sees_the_uninterrupted_batches(wiki_txt, batches, tmp_path):
    run = config(dataset=str(wiki_txt), **RUN)
    tok = CharTokenizer()
    full = train(tiny_model(), run, tokenizer=tok, progress=False, log_dir=tmp_path / "full")
    uninterrupted = list(batches)
    batches.clear()
    first = train(tiny_model(), run, tokenizer=tok, progress=False, log_dir=tmp_path / "cut",
                  stop_after=3)  # stopped after step 3; the checkpoint of step 2 is kept
    second = train(tiny_model(), run, tokenizer=tok, progress=False, log_dir=tmp_path / "cut")
    assert second.resumed_from == 2 and len(batches) == 3 + 4
    resumed = batches[:2] + batches[3:]  # step 3 of the first run is trained again
    assert len(uninterrupted) == 6
    for got, want in zip(resumed, uninterrupted, strict=True):
        np.testing.assert_array_equal(got, want)
    assert all(b.shape == (2, 2, 32) for b in uninterrupted)
    assert len({b.tobytes() for b in uninterrupted}) == 6  # the stream moves on
    np.testing.assert_array_equal(first.losses[:2] + second.losses, full.losses)
    assert full.losses[-1] < full.losses[0]
    assert full.data["streamed"] and full.data["rows_read_here"] == 2
    # the checkpoint's data item (Orbax JSON): the stream's identity and every row's position
    state = json.loads((tmp_path / "cut" / "checkpoints" / "6" / "data" / "metadata").read_text())
    assert state["batches"] == 6 and sorted(state["slots"]) == ["0", "1"]
    assert state["source"] == str(wiki_txt.resolve()) and state["micro_batch"] == 2


def test_a_checkpoint_of_another_stream_is_refused(wiki_txt, tmp_path):
    tok = CharTokenizer()
    train(tiny_model(), config(dataset=str(wiki_txt), **RUN), tokenizer=tok, progress=False,
          log_dir=tmp_path / "run", stop_after=2)
    other = config(dataset=str(wiki_txt), **{**RUN, "seed": 5})
    with pytest.raises(UserError, match="another data stream .*seed 0 -> 5"):
        train(tiny_model(), other, tokenizer=tok, progress=False, log_dir=tmp_path / "run")
    in_memory = config(dataset=str(wiki_txt), **{k: v for k, v in RUN.items() if k != "stream"})
    with pytest.raises(UserError, match="data position of a different data pipeline"):
        train(tiny_model(), in_memory, tokenizer=tok, progress=False, log_dir=tmp_path / "run")


def test_nnxprune_train_checks_a_streamed_dataset_before_loading(capsys, tmp_path):
    from test_cli import assert_user_error, run

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n["not an object"]\n')
    for dataset, needle in ((tmp_path / "shards" / "*.parquet", "no file matches"),
                            (bad, "bad.jsonl:2: expected an object with a string field 'text'")):
        recipe = tmp_path / "r.toml"
        recipe.write_text(f'[recovery]\nkind = "pretrain"\ndataset = "{dataset}"\n'
                          f'[recovery.stream]\n')
        code, _, err = run(capsys, "train", tmp_path / "no-model", "--recipe", recipe,
                           "--out", tmp_path / "out")
        assert_user_error(code, err, needle)
        assert not (tmp_path / "out").exists()
