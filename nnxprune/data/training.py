"""Training data: documents packed into token windows, served by a deterministic, resumable grain
pipeline.

Documents (C4, WikiText-2 train, or a local .txt / .jsonl / .parquet file; the same sources as
calibration, `nnxprune.data.sources`) are tokenized in order, joined with the tokenizer's EOS
token and cut into windows of `seqlen` tokens. The split is by document: the first documents fill
the held-out windows, training starts at the next document, so no document is in both. Only as
many documents are tokenized as the run needs.

`train_iterator` shuffles the windows with the seed (a new order each epoch), batches them into
`[grad_accum, batch_size / grad_accum, seqlen]` and returns a grain iterator whose
`get_state()` / `set_state()` resume it exactly.

Instruction data (`instruction_windows`, LLM-Pruner's LoRA stage, `post_training.py`): a JSONL
file of `instruction` / `input` / `output` records, each formatted with the Alpaca template
(`LLMPruner/utils/prompter.py`), tokenized with EOS appended, cut at `seqlen` and padded with EOS:
one record per window, not packed. Tokens that are no target of the loss (the prompt, as
`train_on_inputs = False`, and the padding) are stored as `-(id + 1)`: the window keeps one int32
array (iterators, sharding and checkpoints unchanged); `recovery.losses` reads the id back for
the input and drops the position from the cross-entropy.

Example:
    >>> windows = load_windows(tokenizer, "c4", seqlen=512, train_windows=1600, heldout_windows=16)
    >>> it = train_iterator(windows.train, batch_size=8, grad_accum=1, seed=0)
    >>> batch = next(it)                        # int32 [1, 8, 512]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from nnxprune.data import sources
from nnxprune.data.tokens import encode
from nnxprune.errors import UserError


@dataclasses.dataclass(frozen=True, eq=False)
class TokenWindows:
    """Packed windows: `train [N, seqlen]`, `heldout [M, seqlen]` (int32) and their source."""

    train: np.ndarray
    heldout: np.ndarray
    source: str
    documents: int = 0  # documents tokenized

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "seqlen": int(self.train.shape[1]),
                "train_windows": int(self.train.shape[0]),
                "heldout_windows": int(self.heldout.shape[0]), "documents": self.documents}


def fill_windows(docs: Sequence[str], tokenizer: Any, *, seqlen: int, start: int,
                 windows: int) -> tuple[np.ndarray, int]:
    """Up to `windows` windows `[n, seqlen]` of the documents from `start` on, tokenized in order
    and EOS-joined (blank documents skipped), and the index of the first document not read."""
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [] if eos is None else [int(eos)]
    buf: list[int] = []
    need = windows * seqlen
    i = start
    while len(buf) < need and i < len(docs):
        text = docs[i]
        i += 1
        if not text or not text.strip():
            continue
        buf.extend(encode(tokenizer, text, add_special_tokens=False).tolist())
        buf.extend(sep)
    n = min(len(buf) // seqlen, windows)
    return np.asarray(buf[:n * seqlen], np.int32).reshape(n, seqlen), i


def heldout_split(docs: Sequence[str], tokenizer: Any, *, seqlen: int, heldout_windows: int,
                  source: str = "") -> tuple[np.ndarray, int]:
    """The held-out windows (the first documents) and the first document left for training."""
    heldout, next_doc = fill_windows(docs, tokenizer, seqlen=seqlen, start=0,
                                     windows=heldout_windows)
    if len(heldout) < heldout_windows:
        raise UserError(f"{source or 'the data'} is too short for {heldout_windows} held-out "
                        f"windows of {seqlen} tokens")
    return heldout, next_doc


def pack(docs: Sequence[str], tokenizer: Any, *, seqlen: int, train_windows: int,
         heldout_windows: int, source: str = "") -> TokenWindows:
    """Tokenizes `docs` in order, EOS-joined, into held-out then training windows."""
    heldout, next_doc = heldout_split(docs, tokenizer, seqlen=seqlen,
                                      heldout_windows=heldout_windows, source=source)
    train, end = fill_windows(docs, tokenizer, seqlen=seqlen, start=next_doc,
                              windows=train_windows)
    if len(train) == 0:
        raise UserError(f"{source or 'the data'} has no training window of {seqlen} tokens left "
                        f"after the held-out split")
    return TokenWindows(train=train, heldout=heldout, source=source, documents=end)


def documents(dataset: str, data_dir=None) -> tuple[Sequence[str], str]:
    """The documents of `dataset` ("c4", "wikitext2" or a file path) and where they came from."""
    resolved = sources.resolve_dataset(dataset)
    if resolved.kind == "wikitext2":  # the train split (perplexity is measured on the test split)
        text, source = sources.wikitext2_train_text()  # one joined stream: cut into 20k-char parts
        return [text[i:i + 20_000] for i in range(0, len(text), 20_000)], source
    return sources.read_documents(resolved, data_dir)


def load_windows(tokenizer: Any, dataset: str, *, seqlen: int, train_windows: int,
                 heldout_windows: int, data_dir=None) -> TokenWindows:
    """Packed windows of `dataset` (see the module docstring)."""
    docs, source = documents(dataset, data_dir)
    return pack(docs, tokenizer, seqlen=seqlen, train_windows=train_windows,
                heldout_windows=heldout_windows, source=source)


def train_iterator(windows: np.ndarray, *, batch_size: int, grad_accum: int, seed: int):
    """A resumable grain iterator of int32 `[grad_accum, batch_size // grad_accum, seqlen]`
    batches: shuffled with `seed`, reshuffled each epoch, endless."""
    import grain

    if len(windows) < batch_size:
        raise UserError(f"only {len(windows)} training windows for a batch of {batch_size}")
    micro = batch_size // grad_accum
    ds = (grain.MapDataset.source(np.asarray(windows, np.int32)).shuffle(seed=seed).repeat(None)
          .batch(batch_size, drop_remainder=True)
          .map(lambda b: np.asarray(b, np.int32).reshape(grad_accum, micro, -1)))
    return iter(ds.to_iter_dataset())


def heldout_batches(windows: np.ndarray, batch_size: int, batches: int) -> list[np.ndarray]:
    """The first `batches` full held-out batches `[batch_size, seqlen]`, in order."""
    n = min(batches, len(windows) // batch_size)
    return [np.asarray(windows[i * batch_size:(i + 1) * batch_size], np.int32) for i in range(n)]


# -- instruction data (Alpaca template, prompt masked) ------------------------------------------
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response:\n")


def not_target(ids: np.ndarray) -> np.ndarray:
    """Marks token ids as inputs that are no target of the loss: `-(id + 1)`."""
    return -np.asarray(ids, np.int32) - 1


def read_instructions(path) -> list[dict]:
    """The records of a JSONL file; UserError naming the first line that is not an object with
    string `instruction` and `output` (and, if present, string `input`)."""
    records = []
    for n, rec in sources.jsonl_records(path):
        bad = [k for k in ("instruction", "output") if not isinstance(rec, dict)
               or not isinstance(rec.get(k), str)]
        if isinstance(rec, dict) and not isinstance(rec.get("input", ""), str):
            bad.append("input")
        if bad:
            raise UserError(f"{path} line {n}: an instruction record needs string "
                            f"'instruction' and 'output' (optional 'input'); bad or missing: "
                            f"{', '.join(bad)}")
        records.append(rec)
    if not records:
        raise UserError(f"{path} holds no instruction records")
    return records


def instruction_records(path, *, heldout_windows: int, batch_size: int = 1) -> list[dict]:
    """`read_instructions`, with enough records for the held-out windows and then a training
    batch; needs no tokenizer, so a run checks its data with it before loading the model."""
    records = read_instructions(path)
    left = len(records) - heldout_windows
    if left < max(batch_size, 1):
        have = "none" if left <= 0 else f"only {left}"
        raise UserError(f"{path} has {len(records)} records: {have} left for training after "
                        f"{heldout_windows} held-out windows (a batch takes {batch_size})")
    return records


def alpaca_prompt(record: dict) -> str:
    """The Alpaca prompt of a record (the template without input when `input` is empty)."""
    if record.get("input"):
        return ALPACA_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_NO_INPUT.format(instruction=record["instruction"])


def instruction_window(tokenizer: Any, record: dict, seqlen: int) -> np.ndarray:
    """One record as a window of `seqlen` ids, prompt and padding marked `not_target`."""
    eos = int(tokenizer.eos_token_id)
    prompt = alpaca_prompt(record)
    full = encode(tokenizer, prompt + record["output"])[:seqlen]
    if len(full) < seqlen and (len(full) == 0 or full[-1] != eos):
        full = np.append(full, eos).astype(np.int32)
    n_prompt = min(len(encode(tokenizer, prompt)), len(full))
    window = np.full(seqlen, not_target([eos])[0], np.int32)
    window[:n_prompt] = not_target(full[:n_prompt])
    window[n_prompt:len(full)] = full[n_prompt:]
    return window


def instruction_windows(tokenizer: Any, path, *, seqlen: int, train_windows: int,
                        heldout_windows: int) -> TokenWindows:
    """The first `heldout_windows` records held out, the next (up to `train_windows`) for
    training; one window per record (module docstring)."""
    records = instruction_records(path, heldout_windows=heldout_windows)
    rows = [instruction_window(tokenizer, r, seqlen)
            for r in records[:heldout_windows + train_windows]]
    train, empty = np.stack(rows[heldout_windows:]), np.zeros((0, seqlen), np.int32)
    if not (train[:, 1:] >= 0).any():  # the loss would be 0 at every step: nothing to learn
        raise UserError(f"{path}: every training record's prompt fills its {seqlen}-token window, "
                        f"leaving no response token to train on; raise recovery.seqlen")
    return TokenWindows(train=train,
                        heldout=np.stack(rows[:heldout_windows]) if heldout_windows else empty,
                        source=str(path), documents=len(rows))
