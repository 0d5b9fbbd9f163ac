"""Data domains for continued pretraining with dynamic batch loading (Sheared LLaMA, Xia et al.,
arXiv 2310.06694, section 2.2; reference princeton-nlp/LLM-Shearing).

The paper's domains are the seven RedPajama subsets (`set_names = [cc, github, book,
stackexchange, wiki, arxiv, c4-rp]`), each with its own held-out set. Here a recipe names each
domain's source, and every domain is packed (`training.pack`) into its own held-out windows (its
first documents) and training windows (the documents after them):

- `source = "c4"`: the data folder's C4 validation slice (without a folder, the Wanda / SparseGPT
  reference's hub train shard), the same text recovery reads; `"wikitext2"`: the hub's train
  split; a local `.txt` / `.jsonl` / `.parquet` file (`sources.file_documents`);
  `"hf:OWNER/NAME"` or `"hf:OWNER/NAME:CONFIG"` with `split`: any hub dataset with a `text`
  column, loaded by the same hub path as the others (an unreachable hub is one clear error naming
  the local alternative).
- A filter on the documents' URLs, for sources that have them (C4, a parquet file with a `url`
  column, a hub dataset with a `url` column): `url = 'REGEX'` (searched in the URL) and / or
  `category = "news"`, one of `SITE_CATEGORIES`. Categories are a host / path heuristic of ours
  (keyword lists below), checked in order, first match wins; `"other"` is every URL that matches
  none. C4 has no domain labels, so this is how one C4 slice becomes several domains.

Recipe form (`[recovery.domains.NAME]`, read by `recovery.config`):

    [recovery.domains.news]
    source = "c4"
    category = "news"
    weight = 1.0               # initial sampling weight (normalized over the domains)
    reference_loss = 2.9       # optional: the loss this domain should reach (see recovery.dynamic)

Everything that can fail on bad input fails in `check_domains` (reads only the URL column), before
any tokenizing.

Example:
    >>> specs = parse_domains({"news": {"source": "c4", "category": "news"},
    ...                        "blogs": {"source": "c4", "category": "blogs"}})
    >>> check_domains(specs, data_dir)
    >>> windows = load_domain_windows(specs, tokenizer, seqlen=128, train_windows=160,
    ...                               heldout_windows=8, data_dir=data_dir)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnxprune.data import sources
from nnxprune.data.training import TokenWindows, documents, pack
from nnxprune.errors import UserError

HUB_PREFIX = "hf:"
# site categories of a URL: (name, regex searched in the lowercased host + path); first match wins
SITE_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("wikipedia", r"^[^/]*wikipedia\.org(/|$)"),
    ("forums", r"forum|reddit\.com|stackexchange\.com|stackoverflow\.com|quora\.com|/threads?/"
               r"|/topic/|^community\.|^answers\.|/community/|/discussion"),
    ("news", r"news|reuters\.com|nytimes\.com|bbc\.co|cnn\.com|theguardian\.com|washingtonpost"
             r"|forbes\.com|bloomberg\.com|npr\.org|apnews\.com|usatoday\.com|latimes\.com"
             r"|wsj\.com|times\.|tribune|herald|gazette|csmonitor\.com|espn\.com|/politics/"
             r"|thegatewaypundit|huffpost"),
    ("blogs", r"blog|wordpress\.com|tumblr\.com|medium\.com|typepad\.com|livejournal\.com"),
)
CATEGORIES = tuple(name for name, _ in SITE_CATEGORIES) + ("other",)
_COMPILED = tuple((name, re.compile(rx)) for name, rx in SITE_CATEGORIES)


def site_category(url: str | None) -> str:
    """The `SITE_CATEGORIES` name of a URL (scheme and `www.` ignored), else "other"."""
    text = re.sub(r"^[a-z]+://(www\.)?", "", (url or "").strip().lower())
    for name, rx in _COMPILED:
        if rx.search(text):
            return name
    return "other"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DomainSpec:
    """One domain of a recipe: where its documents come from and its initial weight."""

    source: str
    url: str | None = None
    category: str | None = None
    split: str = "train"  # hub sources only
    weight: float = 1.0
    reference_loss: float | None = None

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise UserError(f"a domain's source must be a name or a file, got {self.source!r}")
        if self.url is not None:
            if not isinstance(self.url, str) or not self.url:
                raise UserError(f"a domain's url filter must be a regex, got {self.url!r}")
            try:
                re.compile(self.url)
            except re.error as e:
                raise UserError(f"url filter {self.url!r} is not a valid regex ({e})") from None
        if self.category is not None and self.category not in CATEGORIES:
            raise UserError(_nearest(str(self.category), CATEGORIES, "site category"))
        if not isinstance(self.split, str) or not self.split:
            raise UserError(f"a domain's split must be a name, got {self.split!r}")
        if not _number(self.weight) or self.weight < 0:
            raise UserError(f"a domain's weight must be a number >= 0, got {self.weight!r}")
        if self.reference_loss is not None and (not _number(self.reference_loss)
                                                or self.reference_loss < 0):
            raise UserError(f"a domain's reference_loss must be a number >= 0, got "
                            f"{self.reference_loss!r}")

    @property
    def filtered(self) -> bool:
        return self.url is not None or self.category is not None

    def keep(self, url: str | None) -> bool:
        """Whether a document with this URL belongs to the domain."""
        if self.url is not None and not re.search(self.url, url or ""):
            return False
        return self.category is None or site_category(url) == self.category

    def describe(self) -> str:
        parts = [self.source] + ([f"url ~ {self.url!r}"] if self.url else []) \
            + ([f"category {self.category}"] if self.category else [])
        return ", ".join(parts)


def _number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _nearest(name: str, options, what: str) -> str:
    near = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"unknown {what} {name!r}; {hint}known: {', '.join(options)}"


def parse_domains(section: Any, where: str = "recovery.domains") -> dict[str, DomainSpec]:
    """`{name: DomainSpec}` from a recipe's `[recovery.domains]` table (UserError on an unknown
    key, a bad value, no domain, or initial weights that do not sum to more than 0)."""
    if not isinstance(section, dict) or not section:
        raise UserError(f"[{where}] must be a table of domains, e.g. [{where}.news] with a source")
    fields = {f.name for f in dataclasses.fields(DomainSpec)}
    specs = {}
    for name, table in section.items():
        if isinstance(table, DomainSpec):
            specs[name] = table
            continue
        if not isinstance(table, dict):
            raise UserError(f"[{where}.{name}] must be a table with a 'source'")
        for key in table:
            if key not in fields:
                raise UserError(f"{where}.{name}: " + _nearest(key, sorted(fields), "key"))
        if "source" not in table:
            raise UserError(f"[{where}.{name}] needs a 'source' (c4, wikitext2, hf:OWNER/NAME "
                            f"or a {'/'.join(sources.FILE_SUFFIXES)} file)")
        try:
            specs[name] = DomainSpec(**table)
        except UserError as e:
            raise UserError(f"{where}.{name}: {e}") from None
    if sum(s.weight for s in specs.values()) <= 0:
        raise UserError(f"{where}: the initial weights sum to 0; give at least one domain a "
                        f"weight > 0")
    return specs


# -- reading -------------------------------------------------------------------------------------
def _hub_name(source: str) -> tuple[str, str | None]:
    """(repo, config) of an `hf:OWNER/NAME[:CONFIG]` source."""
    rest = source[len(HUB_PREFIX):]
    repo, _, config = rest.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"hub source {source!r} must read hf:OWNER/NAME or hf:OWNER/NAME:CONFIG")
    return repo, config or None


def _resolve(spec: DomainSpec):
    """The resolved source (hub sources: None); UserError for unknown names and missing files."""
    if spec.source.startswith(HUB_PREFIX):
        _hub_name(spec.source)
        return None
    resolved = sources.resolve_dataset(spec.source)
    if spec.filtered and not (resolved.kind == "c4" or (
            resolved.kind == "file" and resolved.path.suffix.lower() == ".parquet")):
        raise UserError(f"url / category filters need documents with URLs (c4, a .parquet file "
                        f"with a 'url' column, or a hub dataset with one); {spec.source!r} has "
                        f"none")
    return resolved


def _parquet_columns(path: Path, columns: list[str]) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow raises several types for bad files and missing columns
        raise UserError(f"cannot read column(s) {', '.join(columns)} of {path}: "
                        f"{sources._one_line(e)}") from None
    return {c: table.column(c).to_pylist() for c in columns}


def _local_parquet(spec: DomainSpec, resolved, data_dir) -> Path | None:
    """The parquet file a filtered local domain reads (None for the hub C4 shard)."""
    if resolved.kind == "file":
        return resolved.path
    folder = sources.resolve_data_dir(data_dir)
    if folder is None:
        return None
    path = folder / sources.DATA_FILES[("c4", "validation")]
    if not path.is_file():
        raise UserError(f"data file {path} not found (needed for the C4 domains)")
    return path


def _hub_dataset(spec: DomainSpec, resolved):
    if resolved is None:
        repo, config = _hub_name(spec.source)
        return sources.load_hub(f"{spec.source} ({spec.split})", "use a local file or c4 instead",
                                repo, config, split=spec.split), spec.source
    source = f"hf://datasets/{sources.C4_HUB_REPO}/{sources.C4_HUB_FILE}"
    hint = f"pass --data-dir or set {sources.DATA_DIR_ENV} to a folder with the C4 slice"
    return sources.load_hub(source, hint, sources.C4_HUB_REPO,
                            data_files={"train": sources.C4_HUB_FILE}, split="train"), source


def domain_documents(name: str, spec: DomainSpec, data_dir=None) -> tuple[Sequence[str], str]:
    """(documents, where they came from) of one domain, its URL filter applied."""
    resolved = _resolve(spec)
    where = f"domain {name!r} ({spec.describe()})"
    if resolved is not None and not spec.filtered:
        docs, source = documents(spec.source, data_dir)
    elif resolved is not None and (path := _local_parquet(spec, resolved, data_dir)) is not None:
        cols = _parquet_columns(path, ["text", "url"])
        docs = [t or "" for t, u in zip(cols["text"], cols["url"]) if spec.keep(u)]
        source = str(path.resolve())
    else:  # the hub: a named dataset, or C4 without a data folder
        ds, source = _hub_dataset(spec, resolved)
        if spec.filtered:
            if "url" not in ds.column_names:
                raise UserError(f"{where}: {source} has no 'url' column to filter on")
            ds = ds.select([i for i, u in enumerate(ds["url"]) if spec.keep(u)])
        docs = sources.ArrowTexts(ds)
    if len(docs) == 0:
        raise UserError(f"{where}: no documents" + (" pass the filter" if spec.filtered else ""))
    return docs, source + (f" [{spec.describe()}]" if spec.filtered else "")


def check_domains(specs: dict[str, DomainSpec], data_dir=None) -> None:
    """Fails fast (UserError) on what `load_domain_windows` would fail on: unknown sources,
    missing files, an unreachable hub, and local filters that keep no document (this reads the
    URL column). Tokenizes nothing."""
    for name, spec in specs.items():
        where = f"recovery.domains.{name}"
        try:
            resolved = _resolve(spec)
            if resolved is None:
                sources._require_hub(spec.source, "use a local file or c4 instead")
                continue
            if resolved.kind == "c4" and not spec.filtered:
                sources.check_source("c4", data_dir)
            if resolved.kind == "wikitext2":  # its train split comes from the hub only
                sources._require_hub("wikitext2/train", "use a local file or c4 instead")
            path = _local_parquet(spec, resolved, data_dir) if spec.filtered else None
            if spec.filtered and path is None:
                sources._require_hub("the C4 shard", "pass --data-dir or set "
                                     f"{sources.DATA_DIR_ENV} to a folder with the C4 slice")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if path is not None:
            urls = _parquet_columns(path, ["url"])["url"]
            if not any(spec.keep(u) for u in urls):
                raise UserError(f"{where}: no document of {path} passes the filter "
                                f"({spec.describe()}; {len(urls)} documents read)")


def load_domain_windows(specs: dict[str, DomainSpec], tokenizer: Any, *, seqlen: int,
                        train_windows: int, heldout_windows: int,
                        data_dir=None) -> dict[str, TokenWindows]:
    """Every domain packed into `heldout_windows` held-out windows (its first documents) and up to
    `train_windows` training windows (the documents after them; at least one)."""
    check_domains(specs, data_dir)
    out = {}
    for name, spec in specs.items():
        docs, source = domain_documents(name, spec, data_dir)
        try:
            out[name] = pack(docs, tokenizer, seqlen=seqlen, train_windows=train_windows,
                             heldout_windows=heldout_windows, source=source)
        except UserError as e:
            raise UserError(f"recovery.domains.{name}: {e}") from None
    return out
