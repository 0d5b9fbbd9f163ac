"""Small local lm-eval tasks made from real text (WikiText-2 test rows), for tests and benchmarks.

`write_wikitext_tasks(folder)` writes two lm-eval task YAMLs with JSONL data beside them:
`wiki_next` (multiple choice: a WikiText-2 paragraph's opening sentences, then its true next
sentence against three sentences drawn from elsewhere in the file) and `wiki_roll` (rolling
log-likelihood of whole paragraphs, metric word perplexity). Pass the folder as lm-eval's
include path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from nnxprune.errors import UserError


def wikitext_paragraphs(n: int, data_dir=None) -> list[str]:
    """The first `n` WikiText-2 test rows longer than 80 characters that are not headings."""
    from nnxprune import data as data_lib

    path = Path(data_lib.resolve_data_dir(data_dir)) / "wiki.test.raw"
    if not path.is_file():
        raise UserError(f"{path} not found: set --data-dir or NNXPRUNE_DATA_DIR")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if len(ln) > 80 and not ln.startswith("=")][:n]


def write_wikitext_tasks(folder, n_mc: int = 6, n_roll: int = 3, *, data_dir=None,
                         seed: int = 0, context_sentences: int = 1) -> Path:
    """Writes `wiki_next` (`n_mc` documents) and `wiki_roll` (`n_roll`) into `folder`.

    A `wiki_next` document is a WikiText-2 paragraph's first `context_sentences` sentences; its
    choices are the paragraph's next sentence and three sentences of paragraphs used by no
    document, in a seeded random order."""
    rng = random.Random(seed)
    lines = wikitext_paragraphs(10 ** 6, data_dir)
    paragraphs = [[s.strip() + "." for s in ln.split(" . ") if len(s.split()) > 6] for ln in lines]
    usable = [i for i, p in enumerate(paragraphs) if len(p) > context_sentences]
    if len(usable) < n_mc + 20:
        raise UserError(f"not enough WikiText-2 paragraphs for {n_mc} documents")
    others = [s for i in usable[n_mc:] for s in paragraphs[i]]
    mc = []
    for i in usable[:n_mc]:
        sentences = paragraphs[i]
        choices = [sentences[context_sentences]] + rng.sample(others, 3)
        order = list(range(4))
        rng.shuffle(order)
        mc.append({"context": " ".join(sentences[:context_sentences]),
                   "choices": [choices[k] for k in order], "label": order.index(0)})
    roll = [{"text": lines[100 + i]} for i in range(n_roll)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_task(folder, "wiki_next", "mc.jsonl", mc, """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
""")
    _write_task(folder, "wiki_roll", "roll.jsonl", roll, """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
""")
    return folder


def _write_task(folder: Path, name: str, data: str, docs: list[dict], spec: str) -> None:
    """Writes `docs` as JSONL to `folder / data` and the lm-eval task `name` over it: the YAML of
    a local JSON test split, then `spec` (output type, prompts, metrics)."""
    (folder / data).write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder.resolve() / data}
test_split: test
""" + spec)
