"""Zero-shot evaluation through lm-evaluation-harness: the `nnxprune` model for lm-eval.

lm-eval (EleutherAI, https://github.com/EleutherAI/lm-evaluation-harness) is how the pruning
papers report zero-shot accuracy. `NnxpruneLM` is an `lm_eval.api.model.TemplateLM` that runs any
model nnxprune can load (card name, HF folder, GGUF, nnxprune checkpoint; dense, masked or
surgically pruned) and gives the numbers lm-eval's `hf` model gives for the same weights:

- tokenization is lm-eval's own (`TemplateLM.loglikelihood` / `_encode_pair`), `tok_encode`
  follows the `hf` model (special tokens as the tokenizer adds them, no second BOS), the prefix
  token for an empty context is BOS (else EOS), and rolling windows are lm-eval's
  (`get_rolling_token_windows`, context 1);
- scoring is exact: the log-probability of every continuation token under the model, in float32.

Speed. The requests that share a context (the choices of a multiple-choice question, the
one-token continuations of one prompt) become one *tree*: the context once, then every choice's
`continuation[:-1]` after it, each choice at the positions it has in its own long row. Attention
inside a tree is masked so that a choice sees the context and its own earlier tokens only, which
is exact (the same keys, values and positions as one long row per request) and computes every
context once: a 4-way question with a context as long as its choices costs about 40% less.
Trees are packed, best fit, into rows of `PACK_TOKENS` tokens (several short questions to a row;
rows never see each other), and a tree too long for one goes in a row of its own length bucket.
Calls take about `ROW_TOKENS * batch_size` tokens. A whole task thus compiles a few shapes (a
task of one kind: usually two or three), and padding is small. Tokens are embedded on the host,
and the output head runs only on the scored positions, gathered into chunks of fixed row counts,
so neither adds compiled shapes. The head's greedy check is a masked max, not an argmax (see
`evaluate.head`).
`generate_until` is greedy (or sampled when a task asks) with nnxprune's jitted KV-cache decoder;
the text is cut at the first stop sequence as lm-eval's `hf` model cuts it.

lm-eval 0.4.13 has no plugin discovery for models: `nnxprune` is registered in lm-eval's model
registry when this module is imported. `nnxprune lm-eval ...` does that, and so does
`python -m nnxprune.evaluate.lmeval ARGS` (lm-eval's own command line, e.g. `run --model nnxprune
--model_args model=smollm2-135m --tasks ...`). torch is not needed on this path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import defaultdict
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from nnxprune.errors import UserError
from nnxprune.evaluate.head import head_logprobs
from nnxprune.models.attention import tree_attention

__all__ = ["NnxpruneLM", "bucket_length", "fine_length", "run_tasks", "results_table"]

ROW_TOKENS = 256  # tokens per unit of `batch_size` in one call (see _loglikelihood_tokens)
PACK_TOKENS = 512  # tokens of a packed row of trees (see _pack)
TREE_TOKENS = 1024  # a tree of one context grows to at most this many tokens (see _trees)
HEAD_ROWS, HEAD_ROWS_SMALL = 512, 128  # the output head's two chunk sizes (see _Scorer._score)


def bucket_length(n: int, max_length: int | None = None) -> int:
    """The padded length for `n` tokens: 1, 2, 4, 8, 16, then powers of two and 1.5 times them
    (24, 32, 48, 64, 96, 128, ...), so padding wastes at most a third (a sixth on average) while a
    whole task compiles a handful of shapes; at most `max_length` (when given and >= n)."""
    b = 1
    while b < n:
        b = b * 2 if b < 16 else b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 16, 24, 32, 48
    return b if max_length is None or n > max_length else min(b, max_length)


def fine_length(n: int) -> int:
    """The padded length of a row longer than `PACK_TOKENS` (a long tree, a rolling window):
    powers of two up to 16, then four steps per octave (20, 24, 28, 32, 40, 48, 56, 64, 80, ...),
    so padding wastes at most a fifth (about a ninth on average). Each length is one more
    compilation (of a single decoder layer, ~0.2 s)."""
    if n <= 16:
        return bucket_length(n)
    step = _pow2_floor(n - 1) // 4
    return -(-n // step) * step


# --- the jitted pieces --------------------------------------------------------------------------
# The model runs one decoder layer per call: jit compiles one program per layer *shape* and input
# shape (all layers of a dense model share it; `graphdef` is a static argument, so an equal layer
# of another NnxpruneLM shares it too), not one program the size of the whole unrolled model
# (about 0.2 s instead of ~10 s for SmolLM2). The Python loop over layers adds a few
# milliseconds of dispatch per call of thousands of tokens.
#
# The layer is the model's own `DecoderLayer`, with the tree attention kernel plugged in
# (`attention_fn`), run by the model's own layer loop (`Llama.run_layers`, one jitted call per
# layer through its `layer_call`).


def _static_jit(fn):
    return jax.jit(fn, static_argnums=0)


@_static_jit
def _layer(graphdef, state, x, positions, segment, branch, inv_freq):
    """One decoder layer on packed rows `x [B, T, E]`, attention within trees
    (`models.attention.tree_attention`); `positions [B, T]` are each token's position in its own
    request's row."""
    fn = functools.partial(tree_attention, segment=segment, branch=branch)
    return nnx.merge(graphdef, state)(x, positions, inv_freq, attention_fn=fn)[0]


@_static_jit
def _head_rows(graphdef, state, h, targets):
    """`h [C, E]` last-layer hidden states (before the final norm), `targets [C]`: their
    log-probabilities and whether each is the greedy token, `[C]` each (`evaluate.head`)."""
    model = nnx.merge(graphdef, state)
    return head_logprobs(model, model.norm(h), targets, with_greedy=True)


class _Scorer:
    """Runs the model layer by layer through the jitted pieces above; records the distinct input
    shapes it ran (each is one compilation per distinct layer shape).

    The embedding lookup and the output head take no part in the shapes: tokens are embedded on
    the host (a row gather), and the head runs on the scored positions only, gathered on the host
    into chunks of `HEAD_ROWS` (or `HEAD_ROWS_SMALL`) rows, so two head programs serve a whole
    task whatever its lengths."""

    def __init__(self, model):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.layers = [nnx.split(layer) for layer in model.layers]
        self.inv_freq = model.inv_freq
        self.embedding = np.asarray(model.embed_tokens.effective_embedding())
        self.shapes: set[tuple] = set()
        self.tokens = 0  # token positions run through the layers, padding included
        self.head_rows = 0  # rows run through the output head, padding included

    def _embed(self, tokens: np.ndarray) -> jax.Array:
        return jnp.asarray(self.embedding[tokens])

    def _score(self, h: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities and greedy flags `[M]` of `targets [M]` after hidden states
        `h [M, E]`: the head in chunks of fixed row counts (the last chunk padded)."""
        m, e = h.shape
        outs, i = [], 0
        while i < m:
            c = HEAD_ROWS if m - i > HEAD_ROWS - HEAD_ROWS_SMALL else HEAD_ROWS_SMALL
            hc, tc = np.zeros((c, e), h.dtype), np.zeros((c,), np.int32)
            hc[:m - i], tc[:m - i] = h[i:i + c], targets[i:i + c]
            self.shapes.add(("head", c))
            self.head_rows += c
            outs.append(_head_rows(self.graphdef, self.state, hc, tc))  # dispatched, not awaited
            i += c
        if not outs:
            return np.zeros((0,), np.float32), np.zeros((0,), bool)
        return (np.concatenate([np.asarray(lp) for lp, _ in outs])[:m],
                np.concatenate([np.asarray(g) for _, g in outs])[:m])

    def packed(self, tokens, positions, segment, branch, row, pos, targets):
        """Packed rows `tokens [B, T]` (see `_layer`): log-probabilities and greedy flags of
        `targets [M]` after positions `pos [M]` of rows `row [M]`."""
        self.shapes.add(("packed", tokens.shape))
        self.tokens += tokens.size
        x = self._embed(tokens)
        positions, segment, branch = (jnp.asarray(a) for a in (positions, segment, branch))

        def layer_call(i, layer, x, positions, inv_freq, cache, attention_fn):
            return _layer(*self.layers[i], x, positions, segment, branch, inv_freq), None

        x = self.model.run_layers(x, positions, layer_call=layer_call).x
        return self._score(np.asarray(x)[row, pos], targets)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@dataclasses.dataclass
class _Tree:
    """A context and the choices after it, as tokens of one packed row: `positions` (in each
    request's own row), `branch` (0: the context; 1, 2, ...: a choice's `continuation[:-1]`) and
    the scored entries `(index in the tree, target token, request)`."""

    tokens: list[int]
    positions: list[int]
    branch: list[int]
    scored: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)


def _trees(requests, max_length: int, cap: int) -> list[_Tree]:
    """The trees of `requests` (`(key, context_ids, continuation_ids)`): the requests of one
    context, truncated as lm-eval's `hf` model truncates (the last `max_length + 1` tokens of
    context + continuation), share a tree while it stays within `cap` tokens (a longer one starts
    another tree of the same context; a single choice may exceed `cap`). Equal continuations of a
    context share a branch."""
    groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
    for i, (_, ctx, cont) in enumerate(requests):
        if not cont:
            raise UserError("lm-eval request with an empty continuation")
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        n = min(len(cont), len(whole) - 1)  # scored tokens: each needs a token before it
        if n < 1:
            raise UserError("lm-eval request with an empty context and a one-token continuation")
        groups[tuple(whole[:-n])].append((i, tuple(whole[-n:])))
    trees = []
    for ctx, members in groups.items():
        tree, starts = None, {}
        for i, cont in members:
            if tree is None or (cont not in starts and starts
                                and len(tree.tokens) + len(cont) - 1 > cap):
                tree, starts = _Tree(list(ctx), list(range(len(ctx))), [0] * len(ctx)), {}
                trees.append(tree)
            if cont not in starts:
                starts[cont] = len(tree.tokens)
                tree.tokens += cont[:-1]
                tree.positions += range(len(ctx), len(ctx) + len(cont) - 1)
                tree.branch += [len(starts)] * (len(cont) - 1)
            start = starts[cont]  # the first token is predicted at the context's last position
            tree.scored.append((len(ctx) - 1, cont[0], i))
            tree.scored += [(start + j, cont[j + 1], i) for j in range(len(cont) - 1)]
    return trees


def _pack(trees: list[_Tree], size: int) -> list[list[_Tree]]:
    """Rows of trees: those of at most `size` tokens best fit (longest first) into rows of `size`
    tokens, each longer one in a row of its own."""
    rows: list[list[_Tree]] = []
    free: dict[int, list[int]] = defaultdict(list)  # tokens left -> rows with that many
    for tree in sorted(trees, key=lambda t: -len(t.tokens)):
        n = len(tree.tokens)
        if n > size:
            rows.append([tree])
            continue
        for left in range(n, size + 1):  # the fullest row it fits in
            if free[left]:
                r = free[left].pop()
                break
        else:
            r, left = len(rows), size
            rows.append([])
        rows[r].append(tree)
        free[left - n].append(r)
    return rows


@register_model("nnxprune")
class NnxpruneLM(TemplateLM):
    """lm-eval model over an nnxprune model. `model` is anything `nnxprune.io.load.load_model`
    takes; or pass `loaded=` (a `LoadedModel`) from Python. A call takes about
    `batch_size * ROW_TOKENS` tokens (`batch_size` rows of 256 tokens); `max_length` is the
    longest model input (default: the model's context)."""

    backend = "causal"

    def __init__(self, model: str | None = None, *, loaded=None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str = "float32", **kwargs):
        super().__init__()
        if loaded is None:
            if not model:
                raise UserError("lm-eval nnxprune model: give model=CARD_OR_PATH")
            from nnxprune.io.load import load_model

            loaded = load_model(model, param_dtype=jnp.dtype(dtype))
        if loaded.tokenizer is None:
            raise UserError("lm-eval needs the model's tokenizer; none was found")
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.model_name = str(model or getattr(loaded, "source", "nnxprune"))
        if batch_size == "auto" or batch_size is None:
            batch_size = 8
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size!r}")
        context = self.model.config.max_position_embeddings
        self.max_length = int(max_length or context)
        if not 2 <= self.max_length <= context:
            raise UserError(f"max_length must be in [2, {context}], got {max_length!r}")
        self.max_gen_toks = int(max_gen_toks)
        self._scorer = _Scorer(self.model)
        # input tokens of the requests as one row each (what a model without sharing runs)
        self.request_tokens = 0

    # --- tokenization, as lm-eval's hf model does it -------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "nnxprune").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring --------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """`requests`: `(key, context_ids, continuation_ids)`; returns `(logprob, is_greedy)`.

        Requests go as trees (`_trees`) packed into rows (`_pack`); a call takes the rows of one
        length, about `ROW_TOKENS * batch_size` tokens (longest rows first: the worst memory up
        front), its row count a power of two."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        self.request_tokens += sum(min(len(ctx) + len(cont), self.max_length + 1) - 1
                                   for _, ctx, cont in requests)
        rows = _pack(_trees(requests, self.max_length, TREE_TOKENS), PACK_TOKENS)
        by_length: dict[int, list[list[_Tree]]] = defaultdict(list)
        for trees in rows:
            n = sum(len(t.tokens) for t in trees)
            by_length[PACK_TOKENS if n <= PACK_TOKENS else fine_length(n)].append(trees)
        pbar = tqdm(total=len(requests), desc="nnxprune loglikelihood", disable=disable_tqdm)
        for T in sorted(by_length, reverse=True):
            group = by_length[T]
            most = max(1, ROW_TOKENS * self.batch_size // T)
            for start in range(0, len(group), most):
                self._score_rows(requests, group[start:start + most], T, most, results, pbar)
        pbar.close()
        return results

    def _score_rows(self, requests, rows: list[list[_Tree]], T: int, most: int, results,
                    pbar) -> None:
        B = min(most, _pow2_ceil(len(rows)))
        tokens = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        segment = np.zeros((B, T), np.int32)  # padding: segment 0
        branch = np.zeros((B, T), np.int32)
        row, pos, targets, owner = [], [], [], []
        for b, trees in enumerate(rows):
            offset = 0
            for seg, tree in enumerate(trees, start=1):
                end = offset + len(tree.tokens)
                tokens[b, offset:end] = tree.tokens
                positions[b, offset:end] = tree.positions
                segment[b, offset:end] = seg
                branch[b, offset:end] = tree.branch
                for index, target, i in tree.scored:
                    row.append(b)
                    pos.append(offset + index)
                    targets.append(target)
                    owner.append(i)
                offset = end
        lp, greedy = self._scorer.packed(tokens, positions, segment, branch, np.array(row),
                                         np.array(pos), np.array(targets, np.int32))
        ids, which = np.unique(np.array(owner), return_inverse=True)
        score = np.zeros(len(ids))
        np.add.at(score, which, lp.astype(np.float64))
        misses = np.zeros(len(ids), np.int64)
        np.add.at(misses, which, ~greedy)
        for i, total, miss in zip(ids.tolist(), score, misses):
            results[i] = (float(total), bool(miss == 0))
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        pbar.update(len(ids))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (score, _) in zip(owner, scores):
            totals[r] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                          postprocess_generated_text)

        from nnxprune.generate import generate

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        out = []
        for req in tqdm(requests, desc="nnxprune generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = int(kw.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise UserError(f"max_gen_toks ({max_new}) must be below max_length "
                                f"({self.max_length})")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            result = generate(self.model, self.tokenizer, ids, max_new_tokens=max_new,
                              temperature=temperature)
            text = postprocess_generated_text(generation=self.tok_decode(list(result.tokens)),
                                              stop=until, think_end_token=None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


# --- running tasks ---------------------------------------------------------------------------

def task_manager(tasks: Sequence[str], include_path: str | None):
    """A TaskManager that indexes only `include_path` when every task is there (lm-eval's
    built-in index costs seconds), else also the built-in tasks."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"--include-path {include_path}: no such folder")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise UserError(f"unknown lm-eval task(s): {', '.join(missing)}"
                        + ("" if include_path else " (local task YAMLs need --include-path)"))
    return manager


def run_tasks(lm: NnxpruneLM, tasks: Sequence[str], *, include_path: str | None = None,
              limit: int | float | None = None, num_fewshot: int | None = None,
              seed: int = 0) -> dict[str, Any]:
    """Runs lm-eval `tasks` on `lm`; returns `{"results": {task: {metric: value}}, ...}`."""
    from lm_eval import evaluator

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("give at least one lm-eval task")
    manager = task_manager(tasks, include_path)
    out = evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                    limit=limit, task_manager=manager, random_seed=seed,
                                    numpy_random_seed=seed, torch_random_seed=seed,
                                    fewshot_random_seed=seed, log_samples=False,
                                    bootstrap_iters=0)
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))
                      and not (isinstance(v, float) and math.isnan(v))}
               for task, metrics in out["results"].items()}
    return {"results": results, "n_samples": out.get("n-samples", {}),
            "num_fewshot": num_fewshot, "limit": limit, "tasks": list(tasks),
            "compiled_shapes": len(lm._scorer.shapes)}


def results_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per task and metric."""
    lines = ["| task | metric | value |", "|---|---|---:|"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or ",none" not in name and "," in name:
                continue
            lines.append(f"| {task} | {name.split(',')[0]} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line with the `nnxprune` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
