"""Data domains of continued pretraining: every source kind (text, JSONL, parquet, the C4 slice
filtered by URL, a hub name) read into per-domain held-out and training windows; bad input fails
with one UserError before any tokenizing."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nnxprune.data import domains, sources
from nnxprune.data.domains import (DomainSpec, check_domains, domain_documents,
                                   load_domain_windows, parse_domains, site_category)
from nnxprune.errors import UserError


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, verbose=False, add_special_tokens=True):
        return {"input_ids": [ord(c) % 120 + 1 for c in text]}


URLS = ["https://en.wikipedia.org/wiki/Moon", "https://www.reuters.com/article/x",
        "http://someone.blogspot.com/2019/01/post.html", "https://forums.example.com/t/1",
        "https://shop.example.com/item/3", "https://www.example.org/about",
        "https://www.nytimes.com/2019/politics/y.html", "https://blog.example.net/p/9"]


def write_c4(path, urls=URLS):
    texts = [f"doc {i} from {u} " + "lorem ipsum dolor sit amet " * 8 for i, u in enumerate(urls)]
    pq.write_table(pa.table({"text": texts, "url": urls, "timestamp": ["t"] * len(urls)}), path)
    return texts


def test_site_categories():
    assert [site_category(u) for u in URLS] == ["wikipedia", "news", "blogs", "forums", "other",
                                               "other", "news", "blogs"]
    assert site_category(None) == "other"


def test_text_jsonl_parquet_sources(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("".join(f"text line {i} " * 5 + "\n" for i in range(30)))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"json record {i} " * 5}) + "\n" for i in range(30)))
    parquet = tmp_path / "c.parquet"
    write_c4(parquet, URLS * 4)
    specs = parse_domains({"t": {"source": str(txt)}, "j": {"source": str(jsonl), "weight": 2},
                           "p": {"source": str(parquet), "category": "blogs"}})
    out = load_domain_windows(specs, CharTokenizer(), seqlen=16, train_windows=5,
                              heldout_windows=2, data_dir=None)
    assert set(out) == {"t", "j", "p"}
    for w in out.values():
        assert w.train.shape == (5, 16) and w.heldout.shape == (2, 16)
    tok = CharTokenizer()
    assert out["j"].heldout[0].tolist() == tok("json record 0 json")["input_ids"][:16]
    assert out["t"].heldout[0].tolist() == tok("text line 0 text")["input_ids"][:16]
    docs, source = domain_documents("p", specs["p"])
    assert len(docs) == 8 and all("blog" in d for d in docs)  # 2 blog URLs x 4 copies
    assert source.endswith("[" + specs["p"].describe() + "]")


def test_c4_slice_url_filters(tmp_path):
    texts = write_c4(tmp_path / "c4_validation_2k.parquet")
    news = DomainSpec(source="c4", category="news")
    docs, source = domain_documents("news", news, tmp_path)
    assert list(docs) == [texts[1], texts[6]]
    assert "c4_validation_2k.parquet" in source
    docs, _ = domain_documents("rx", DomainSpec(source="c4", url=r"example\.(com|org)"), tmp_path)
    assert list(docs) == [texts[3], texts[4], texts[5]]
    both = DomainSpec(source="c4", url=r"example", category="other")
    assert list(domain_documents("b", both, tmp_path)[0]) == [texts[4], texts[5]]
    docs, _ = domain_documents("all", DomainSpec(source="c4"), tmp_path)
    assert list(docs) == texts  # unfiltered: the whole slice, as recovery reads it


@pytest.mark.parametrize("section, message", [
    ({}, "must be a table of domains"),
    ({"a": {"weight": 1.0}}, "needs a 'source'"),
    ({"a": {"source": "c4", "wieght": 1.0}}, "did you mean 'weight'"),
    ({"a": {"source": "c4", "category": "newz"}}, "did you mean 'news'"),
    ({"a": {"source": "c4", "url": "("}}, "not a valid regex"),
    ({"a": {"source": "c4", "weight": -1}}, "weight must be a number >= 0"),
    ({"a": {"source": "c4", "weight": 0}, "b": {"source": "c4", "weight": 0.0}}, "sum to 0"),
    ({"a": {"source": "c4", "reference_loss": "2"}}, "reference_loss must be a number"),
    ({"a": "c4"}, "must be a table with a 'source'"),
])
def test_bad_domain_tables(section, message):
    with pytest.raises(UserError, match=message):
        parse_domains(section)


def test_bad_sources_fail_in_the_check(tmp_path, monkeypatch):
    write_c4(tmp_path / "c4_validation_2k.parquet")
    (tmp_path / "plain.txt").write_text("one\ntwo\n")

    def check(**spec):
        check_domains({"d": DomainSpec(**spec)}, tmp_path)

    with pytest.raises(UserError, match=r"recovery.domains.d: unknown calibration dataset 'c5'"):
        check(source="c5")
    with pytest.raises(UserError, match="not found"):
        check(source=str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="no document of .* passes the filter"):
        check(source="c4", url="no-such-site")
    with pytest.raises(UserError, match="filters need documents with URLs"):
        check(source=str(tmp_path / "plain.txt"), category="news")
    with pytest.raises(UserError, match="hf:OWNER/NAME"):
        check(source="hf:just-a-name")
    monkeypatch.setattr(sources, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub to load hf:owner/set"):
        check(source="hf:owner/set")
    check(source="c4", category="news")  # a good one passes


def test_a_domain_too_short_names_itself(tmp_path):
    write_c4(tmp_path / "c4_validation_2k.parquet")
    specs = parse_domains({"wiki": {"source": "c4", "category": "wikipedia"}})
    with pytest.raises(UserError, match="recovery.domains.wiki: .* too short for 40 held-out"):
        load_domain_windows(specs, CharTokenizer(), seqlen=64, train_windows=4,
                            heldout_windows=40, data_dir=tmp_path)


def test_hub_sources_go_through_the_hub_loader(monkeypatch):
    calls = []

    class FakeDataset:
        column_names = ["text", "url"]

        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, key):
            if key == "url":
                return [r["url"] for r in self.rows]
            return self.rows[int(key)]

        def select(self, idx):
            return FakeDataset([self.rows[i] for i in idx])

    def load_hub(what, hint, *args, **kwargs):
        calls.append((args, kwargs))
        return FakeDataset([{"text": f"t{i}", "url": u} for i, u in enumerate(URLS)])

    monkeypatch.setattr(domains.sources, "load_hub", load_hub)
    docs, source = domain_documents("h", DomainSpec(source="hf:owner/set:cfg", split="validation",
                                                    category="news"))
    assert calls == [(("owner/set", "cfg"), {"split": "validation"})]
    assert [docs[i] for i in range(len(docs))] == ["t1", "t6"] and source.startswith("hf:owner/set")


def test_wikitext2_train_needs_the_hub(monkeypatch):
    monkeypatch.setattr(sources, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    with pytest.raises(UserError, match="recovery.domains.w: cannot reach the Hugging Face hub "
                                        "to load wikitext2/train"):
        check_domains({"w": DomainSpec(source="wikitext2")}, None)
