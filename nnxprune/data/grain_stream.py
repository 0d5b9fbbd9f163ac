"""Training data streamed from files through grain: tokenized and packed lazily, each process
reading only the rows of the batch it holds, resumable from a checkpoint.

The in-memory path (`training.load_windows` + `train_iterator`) tokenizes `steps x batch_size`
windows up front. A recipe with `[recovery.stream]` reads the documents (`grain_sources`: parquet,
JSONL, text, globs of them, the data folder's C4 slice) while it trains, so continued
pretraining over billions of tokens needs memory for a few documents per row.

The stream. The held-out windows are the first documents in file order, packed exactly as the
in-memory path packs them (`training.heldout_split`: the same held-out set, the same held-out
losses). Training reads the documents after them, in a seeded random order (`shuffle = true`:
`grain.MapDataset.shuffle`, an index permutation reseeded every epoch, no buffer) or in file
order, endlessly. Each of the `micro = batch_size / grad_accum` rows of a micro-batch is its own
packed stream ("row" r reads every micro-th document from position r: grain's slice
`ds[r::micro]`), tokenized without special tokens, EOS appended, concatenated and cut into windows
of `seqlen` tokens by grain's `ConcatThenSplitIterDataset`, with no padding. Micro-batch a of step
b holds window `b * grad_accum + a` of every row. So the stream is defined by the data, seed,
seqlen and micro-batch alone: not by the number of processes.

Per-process sharding. A process reads the rows of the global batch that its devices hold (from the
batch's `jax.sharding`, as grain's `ShardOptions(shard_index=jax.process_index(),
shard_count=jax.process_count())` would split them, but exact for any mesh: rows held by several
processes are read by each of them) and the global array is assembled with
`jax.make_array_from_callback`. Two processes read disjoint rows whose union is the 1-process
batch, so a 2-process run trains on the same batches as a 1-process run.

Resume. `get_state()` is JSON: every row's grain iterator state (the position of the first
document still in its packing buffer and the slice of it used, `ConcatThenSplit`'s own state),
gathered from all processes, plus what defines the stream; the trainer saves it with each Orbax
checkpoint (`recovery.logdir`), and `set_state` puts every row back, so a resumed run reads the
batches an uninterrupted one reads, with any number of processes.

Example:
    >>> stream = open_stream(cfg, tokenizer, data_dir, batch_sharding)  # cfg.stream set
    >>> batch = next(stream)            # int32 [grad_accum, micro, seqlen] (global jax.Array
    ...                                 # with several processes)
    >>> state = stream.get_state()      # JSON; stream.set_state(state) resumes
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnxprune.data import grain_sources
from nnxprune.data.tokens import encode
from nnxprune.data.training import heldout_batches, heldout_split
from nnxprune.errors import UserError

STATE_FORMAT = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """`[recovery.stream]`: stream the training documents instead of packing them in memory."""

    shuffle: bool = True  # documents in a seeded random order (reseeded each epoch), else file order

    def __post_init__(self):
        if not isinstance(self.shuffle, bool):
            raise UserError(f"recovery.stream.shuffle must be true or false, got {self.shuffle!r}")


class _Tokenize:
    """A document as `{"tokens": int32 ids + EOS}` (blank: no tokens). Fails when a row met a
    whole epoch of blank documents in a row, which would otherwise loop forever."""

    def __init__(self, tokenizer, limit: int):
        eos = getattr(tokenizer, "eos_token_id", None)
        self.tokenizer, self.sep = tokenizer, ([] if eos is None else [int(eos)])
        self.limit, self.blank = limit, 0

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        if not text or not text.strip():
            self.blank += 1
            if self.blank > self.limit:
                raise UserError(f"a row of the stream read {self.blank} blank documents in a row; "
                                f"the data has too little text")
            return {"tokens": np.zeros(0, np.int32)}
        self.blank = 0
        ids = encode(self.tokenizer, text, add_special_tokens=False)
        return {"tokens": np.concatenate([ids, np.asarray(self.sep, np.int32)])}


def _window(packed: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(packed["tokens"], np.int32)


def row_stream(docs: Sequence[str], tokenizer, *, seqlen: int, row: int, rows: int, seed: int,
               shuffle: bool, start: int = 0):
    """Row `row` of `rows`: the packed windows of every rows-th training document from `row` on
    (documents `start` on, shuffled or not, repeated endlessly), as a grain `IterDataset`."""
    import grain
    from grain.experimental import ConcatThenSplitIterDataset

    ds = grain.MapDataset.source(docs)[start:]
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32)
    ds = ds.repeat(None)[row::rows].map(_Tokenize(tokenizer, limit=len(docs) - start))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return ConcatThenSplitIterDataset(ds, length_struct={"tokens": seqlen}).map(_window)


def shard_rows(micro: int, shard_index: int, shard_count: int) -> list[int]:
    """The rows of a micro-batch that shard `shard_index` of `shard_count` reads: a contiguous
    block, as a batch axis split over processes holds it."""
    if not 0 <= shard_index < shard_count or micro % shard_count:
        raise UserError(f"a micro-batch of {micro} rows cannot be split into {shard_count} shards "
                        f"(shard {shard_index})")
    size = micro // shard_count
    return list(range(shard_index * size, (shard_index + 1) * size))


def local_rows(sharding, shape: tuple[int, ...]) -> list[int]:
    """The rows (axis 1) of a `shape` array that this process's devices hold under `sharding`."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[1].indices(shape[1])))
    return sorted(rows)


def _tuples(state: Any) -> Any:
    """A grain state read back from JSON: `ConcatThenSplit`'s slices are tuples again."""
    if isinstance(state, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _tuples(v))
                for k, v in state.items()}
    if isinstance(state, list):
        return [_tuples(v) for v in state]
    return state


def _gather(slots: dict[str, Any]) -> dict[str, Any]:
    """Every process's row states, in every process (a collective in a multi-process run)."""
    import jax

    if jax.process_count() == 1:
        return slots
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(slots).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32)))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    texts = np.asarray(multihost_utils.process_allgather(buf))
    merged: dict[str, Any] = {}
    for p in range(texts.shape[0]):
        merged.update(json.loads(texts[p, :int(sizes.reshape(-1)[p])].tobytes().decode("utf-8")))
    return merged


class TrainStream:
    """Endless `[grad_accum, micro, seqlen]` batches of the rows `rows` (module docstring), with
    `get_state` / `set_state`, `heldout` batches and `describe` (what the trainer reads)."""

    def __init__(self, docs: Sequence[str], tokenizer, *, source: str, seqlen: int,
                 batch_size: int, grad_accum: int, seed: int, shuffle: bool, heldout: np.ndarray,
                 start: int, heldout_batches: list, rows: Sequence[int] | None = None,
                 sharding=None):
        self.micro, self.grad_accum, self.seqlen = batch_size // grad_accum, grad_accum, seqlen
        self.rows = list(range(self.micro)) if rows is None else sorted(rows)
        self.identity = {"format": STATE_FORMAT, "source": source, "documents": len(docs),
                         "start_document": start, "seqlen": seqlen, "micro_batch": self.micro,
                         "seed": seed, "shuffle": shuffle}
        self.heldout, self.heldout_windows = heldout_batches, int(len(heldout))
        self.sharding = sharding if sharding is not None and _multi() else None  # else numpy
        self._iters = {r: iter(row_stream(docs, tokenizer, seqlen=seqlen, row=r, rows=self.micro,
                                          seed=seed, shuffle=shuffle, start=start))
                       for r in self.rows}
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self):
        local = np.stack([np.stack([next(self._iters[r]) for r in self.rows])
                          for _ in range(self.grad_accum)])  # [A, rows, T]
        self.batches += 1
        return local if self.sharding is None else self._global(local)

    def _global(self, local: np.ndarray):
        import jax

        where = {r: k for k, r in enumerate(self.rows)}

        def piece(index):
            keep = [where[r] for r in range(*index[1].indices(self.micro))]
            return local[index[0]][:, keep][:, :, index[2]]
        return jax.make_array_from_callback((self.grad_accum, self.micro, self.seqlen),
                                            self.sharding, piece)

    def get_state(self) -> dict[str, Any]:
        """JSON: the stream's identity, batches served and every row's grain state (all
        processes' rows: a collective in a multi-process run)."""
        slots = _gather({str(r): it.get_state() for r, it in self._iters.items()})
        return {**self.identity, "batches": self.batches, "slots": slots}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues where `state` (from `get_state`, maybe of another process count) was."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError("the checkpoint's data position is not a streamed one ([recovery."
                            "stream] changed since it was written); use a new --train-dir")
        differ = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in self.identity.items()
                  if state.get(k) != v]
        if differ:
            raise UserError(f"the checkpoint was written for another data stream ("
                            f"{'; '.join(differ)}); use a new --train-dir")
        for r, it in self._iters.items():
            it.set_state(_tuples(state["slots"][str(r)]))
        self.batches = int(state["batches"])

    def describe(self) -> dict[str, Any]:
        return {"source": self.identity["source"], "seqlen": self.seqlen, "streamed": True,
                "shuffle": self.identity["shuffle"], "documents": self.identity["documents"],
                "heldout_windows": self.heldout_windows,
                "first_training_document": self.identity["start_document"],
                "rows_read_here": len(self.rows), "micro_batch": self.micro}


def _multi() -> bool:
    import jax

    return jax.process_count() > 1


def open_stream(cfg, tokenizer, data_dir=None, sharding=None, *, shard_index: int | None = None,
                shard_count: int | None = None) -> TrainStream:
    """The stream of a recovery config with `[recovery.stream]` (`dataset`, `seqlen`,
    `batch_size`, `grad_accum`, `seed`, `eval_batches`). The rows read here are the process's
    share of `sharding` (the trainer's batch sharding), or shard `shard_index` of `shard_count`
    when given, or all."""
    if tokenizer is None:
        raise UserError("a streamed recovery needs a tokenizer")
    docs, source = grain_sources.open_documents(cfg.dataset, data_dir)
    micro = cfg.batch_size // cfg.grad_accum
    heldout, start = heldout_split(docs, tokenizer, seqlen=cfg.seqlen,
                                   heldout_windows=cfg.eval_batches * micro, source=source)
    if not any(docs[i] and docs[i].strip() for i in range(start, len(docs))):
        raise UserError(f"{source} has no document left for training after the "
                        f"{len(heldout)} held-out windows")
    rows = None
    if shard_count is not None:
        rows = shard_rows(micro, shard_index or 0, shard_count)
    elif sharding is not None and _multi():
        rows = local_rows(sharding, (cfg.grad_accum, micro, cfg.seqlen))
    shuffle = cfg.stream.shuffle if getattr(cfg, "stream", None) is not None else True
    return TrainStream(docs, tokenizer, source=source, seqlen=cfg.seqlen,
                       batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
                       shuffle=shuffle, heldout=heldout, start=start,
                       heldout_batches=heldout_batches(heldout, micro, cfg.eval_batches),
                       rows=rows, sharding=sharding)
