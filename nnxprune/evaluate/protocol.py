"""`PerplexityProtocol`: everything that decides a perplexity number, kept beside the number.

Perplexities are only comparable when the text, its joining, the window length, the stride and
the BOS handling agree, so each reported number carries one of these (`to_dict()` in JSON,
`describe()` when printed). `protocol_for` fills the usual per-dataset defaults, which follow the
SparseGPT / Wanda reference code (WikiText-2 test rows joined with "\\n\\n"; the first 1100 C4
validation documents joined with " ").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nnxprune.errors import UserError

# Per-dataset defaults and the splits the loaders know.
_DATASETS: dict[str, dict[str, Any]] = {
    "wikitext2": {"split": "test", "join": "\n\n", "documents": None, "splits": ("test",)},
    "c4": {"split": "validation", "join": " ", "documents": 1100, "splits": ("validation",)},
}
DATASETS: tuple[str, ...] = tuple(_DATASETS)


def _is_int(value: Any) -> bool:
    """True for a real int (bools are not window counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_dataset(dataset: Any) -> None:
    """Raises UserError for a dataset name the loaders do not know."""
    if dataset not in _DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityProtocol:
    """How a perplexity is computed: text, joining, tokenization and windowing.

    `documents` is how many leading rows/documents are joined (None = all); `stride` defaults to
    `seqlen` (non-overlapping windows, the only kind supported so far); `max_windows` None means
    every full window; `add_bos` prepends the tokenizer's BOS once, before the whole stream.
    """

    dataset: str
    split: str
    join: str
    documents: int | None
    seqlen: int = 1024
    stride: int | None = None
    max_windows: int | None = None
    batch_size: int = 1
    add_bos: bool = False

    def __post_init__(self) -> None:
        _check_dataset(self.dataset)
        splits = _DATASETS[self.dataset]["splits"]
        if self.split not in splits:
            raise UserError(f"dataset {self.dataset!r} has no split {self.split!r}; "
                            f"supported: {', '.join(splits)}")
        if not isinstance(self.join, str):
            raise UserError(f"join must be a string, got {self.join!r}")
        if self.documents is not None and (not _is_int(self.documents) or self.documents < 1):
            raise UserError(f"documents must be a positive integer or None, got {self.documents!r}")
        if not _is_int(self.seqlen) or self.seqlen < 2:
            raise UserError(f"seqlen must be an integer >= 2, got {self.seqlen!r}")
        if self.stride is None:
            object.__setattr__(self, "stride", self.seqlen)
        if not _is_int(self.stride) or self.stride < 1:
            raise UserError(f"stride must be a positive integer, got {self.stride!r}")
        if self.stride != self.seqlen:
            raise UserError(f"stride {self.stride} != seqlen {self.seqlen}: only non-overlapping "
                            "windows (stride == seqlen) are supported")
        if self.max_windows is not None and (not _is_int(self.max_windows) or self.max_windows < 1):
            raise UserError(f"max_windows must be a positive integer or None, got {self.max_windows!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.add_bos, bool):
            raise UserError(f"add_bos must be true or false, got {self.add_bos!r}")

    def to_dict(self) -> dict[str, Any]:
        """The protocol as plain JSON types, every field explicit (stride resolved)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerplexityProtocol:
        """Inverse of `to_dict`; missing fields take the dataset's defaults, unknown ones are errors."""
        if not isinstance(data, Mapping) or "dataset" not in data:
            raise UserError("a perplexity protocol needs at least a 'dataset' field")
        rest = {k: v for k, v in data.items() if k != "dataset"}
        return protocol_for(data["dataset"], **rest)

    def describe(self) -> str:
        """One line for logs and reports, e.g. `wikitext2/test: all rows joined with '\\n\\n', ...`."""
        rows = "all rows" if self.documents is None else f"first {self.documents} rows"
        windows = "all windows" if self.max_windows is None else f"first {self.max_windows} windows"
        bos = "BOS prepended" if self.add_bos else "no BOS"
        return (f"{self.dataset}/{self.split}: {rows} joined with {self.join!r}, seqlen {self.seqlen}, "
                f"stride {self.stride}, {windows}, batch {self.batch_size}, {bos}")


_FIELDS = frozenset(f.name for f in dataclasses.fields(PerplexityProtocol))


def protocol_for(dataset: str, **overrides: Any) -> PerplexityProtocol:
    """A protocol with `dataset`'s defaults (split, join, documents), changed by `overrides`."""
    _check_dataset(dataset)
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise UserError(f"unknown perplexity protocol field(s): {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(_FIELDS - {'dataset'}))}")
    defaults = {k: v for k, v in _DATASETS[dataset].items() if k != "splits"}
    return PerplexityProtocol(dataset=dataset, **{**defaults, **overrides})
