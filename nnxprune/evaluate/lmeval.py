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

Speed. Requests are deduplicated and sorted by length, cut into batches of `batch_size` rows and
padded (right, which a causal model never sees) to a few bucket lengths (powers of two from 32),
so jit compiles one program per bucket, not one per request. Requests that share a context (the
choices of a multiple-choice question) share its computation: the context (all but its last
token) runs once per batch row into a KV cache, which is repeated for every choice; each choice
then runs only `[last context token] + continuation[:-1]` against that cache, and the output head
runs only on those positions. Exact (the same keys, values and positions as one long row), it
cuts the work of a 4-way question with a context as long as its choices by about 40%. Requests
alone with their context (rolling windows, one-choice tasks) go as whole rows; among those, rows
whose inputs coincide (one-token continuations of one context) are computed once, the candidates
scored together at the last position.
`generate_until` is greedy (or sampled when a task asks) with nnxprune's jitted KV-cache decoder;
the text is cut at the first stop sequence as lm-eval's `hf` model cuts it.

lm-eval 0.4.13 has no plugin discovery for models: `nnxprune` is registered in lm-eval's model
registry when this module is imported. `nnxprune lm-eval ...` does that, and so does
`python -m nnxprune.evaluate.lmeval ARGS` (lm-eval's own command line, e.g. `run --model nnxprune
--model_args model=smollm2-135m --tasks ...`). torch is not needed on this path.
"""

from __future__ import annotations

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
from nnxprune.evaluate.perplexity import LOGIT_CHUNK

__all__ = ["NnxpruneLM", "bucket_length", "run_tasks", "results_table"]

MIN_BUCKET = 32


def bucket_length(n: int, max_length: int) -> int:
    """The padded length for a row of `n` tokens: the next power of two >= 32, at most
    `max_length`."""
    return min(max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()), max_length)


def _chunked_logprobs(model, h, targets):
    """Log-probabilities of `targets [B, T]` and argmax ids from hidden states `h [B, T, D]`,
    the output head applied `LOGIT_CHUNK` positions at a time."""
    b, t, d = h.shape
    chunk = min(LOGIT_CHUNK, t)
    pad = -t % chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    h_chunks = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    target_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)

    def one(args):
        hc, tc = args
        logits = model.logits(hc).astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return picked - logz, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    lp, top = jax.lax.map(one, (h_chunks, target_chunks))
    return (lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t],
            top.swapaxes(0, 1).reshape(b, n * chunk)[:, :t])


def _score_prefixed(model, prefix, prefix_len, rows, targets, *, choices: int):
    """Shared-context scoring. `prefix [D, Tp]` (right-padded contexts without their last token,
    `prefix_len [D]` real lengths) runs once into a KV cache; `rows [D * choices, Tc]` (row `r`
    continues document `r // choices` from position `prefix_len`) run against it. Returns
    log-probabilities of `targets` and argmax ids, `[D * choices, Tc]`.

    Exact: a row's queries at positions `p + j` see the cached context keys at `0..p-1` and the
    row's own keys at `p..p+j`; the context's padding keys sit at positions the row overwrites or
    that no real query reaches."""
    from nnxprune.models.llama import init_cache

    d, tp = prefix.shape
    tc = rows.shape[1]
    cache = init_cache(model, d, tp + tc, dtype=jnp.float32)
    _, cache = model.hidden_states(prefix, jnp.broadcast_to(jnp.arange(tp), (d, tp)), cache)
    cache = [(jnp.repeat(k, choices, axis=0), jnp.repeat(v, choices, axis=0)) for k, v in cache]
    starts = jnp.repeat(prefix_len, choices)
    h, _ = model.hidden_states(rows, starts[:, None] + jnp.arange(tc)[None, :], cache)
    return _chunked_logprobs(model, h, targets)


def _score_rows(model, tokens, targets, last_pos, last_targets):
    """Log-probabilities `[B, T]` of `targets` at every position, argmax ids `[B, T]`, and the
    log-probabilities `[B, K]` of `last_targets` at position `last_pos [B]` (float32)."""
    h, _ = model.hidden_states(tokens)
    lp, top = _chunked_logprobs(model, h, targets)
    h_last = jnp.take_along_axis(h, last_pos[:, None, None], axis=1)  # [B, 1, D]
    last = jax.nn.log_softmax(model.logits(h_last)[:, 0].astype(jnp.float32), axis=-1)
    return lp, top, jnp.take_along_axis(last, last_targets, axis=1)


class _Scorer:
    """Jitted `_score_rows` over the model's state; counts the shapes it compiled."""

    def __init__(self, model):
        self.graphdef, self.state = nnx.split(model)
        self.shapes: set[tuple[int, ...]] = set()

        @jax.jit
        def run(state, tokens, targets, last_pos, last_targets):
            return _score_rows(nnx.merge(self.graphdef, state), tokens, targets, last_pos,
                               last_targets)

        @functools.partial(jax.jit, static_argnames=("choices",))
        def prefixed(state, prefix, prefix_len, rows, targets, *, choices):
            return _score_prefixed(nnx.merge(self.graphdef, state), prefix, prefix_len, rows,
                                   targets, choices=choices)

        self._run, self._prefixed = run, prefixed

    def __call__(self, tokens, targets, last_pos, last_targets):
        self.shapes.add(("rows",) + tokens.shape + last_targets.shape)
        out = self._run(self.state, tokens, targets, last_pos, last_targets)
        return tuple(np.asarray(x) for x in out)

    def prefixed(self, prefix, prefix_len, rows, targets):
        choices = rows.shape[0] // prefix.shape[0]
        self.shapes.add(("prefixed",) + prefix.shape + rows.shape)
        out = self._prefixed(self.state, prefix, prefix_len, rows, targets, choices=choices)
        return tuple(np.asarray(x) for x in out)


@register_model("nnxprune")
class NnxpruneLM(TemplateLM):
    """lm-eval model over an nnxprune model. `model` is anything `nnxprune.io.load.load_model`
    takes; or pass `loaded=` (a `LoadedModel`) from Python. `batch_size` rows per forward;
    `max_length` the longest model input (default: the model's context)."""

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
        """`requests`: `(key, context_ids, continuation_ids)`; returns `(logprob, is_greedy)`."""
        L = self.max_length
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise UserError("lm-eval request with an empty continuation")
            if len(ctx) > 1 and len(ctx) + len(cont) <= L + 1:
                by_context[tuple(ctx)].append(i)
        shared = {c: ids for c, ids in by_context.items() if len(ids) > 1}
        in_shared = {i for ids in shared.values() for i in ids}
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), desc="nnxprune loglikelihood", disable=disable_tqdm)

        def done(i, score, greedy):
            results[i] = (score, greedy)
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            pbar.update(1)

        self._score_shared(requests, shared, done)
        rows: dict[tuple[int, ...], list[tuple[int, int, int]]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if i in in_shared:
                continue
            whole = (list(ctx) + list(cont))[-(L + 1):]
            rows[tuple(whole[:-1])].append((i, len(cont), whole[-1]))
        # longest first (so the first batch shows the worst memory), then by content
        order = sorted(rows, key=lambda r: (-len(r), r))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            T = bucket_length(len(batch[0]), L)
            K = max(4, 1 << (max(len(rows[r]) for r in batch) - 1).bit_length())
            B = self.batch_size
            tokens = np.zeros((B, T), np.int32)
            targets = np.zeros((B, T), np.int32)
            last_pos = np.zeros((B,), np.int32)
            last_targets = np.zeros((B, K), np.int32)
            for b, inp in enumerate(batch):
                n = len(inp)
                tokens[b, :n] = inp
                targets[b, :n - 1] = inp[1:]
                last_pos[b] = n - 1
                for k, (_, _, tok) in enumerate(rows[inp]):
                    last_targets[b, k] = tok
            lp, top, last_lp = self._scorer(tokens, targets, last_pos, last_targets)
            for b, inp in enumerate(batch):
                n = len(inp)
                for k, (i, n_cont, tok) in enumerate(rows[inp]):
                    lo = n - n_cont  # first scored position
                    score = float(lp[b, lo:n - 1].sum(dtype=np.float64) + last_lp[b, k])
                    greedy = bool(np.all(top[b, lo:n - 1] == targets[b, lo:n - 1])
                                  and top[b, n - 1] == tok)
                    done(i, score, greedy)
        pbar.close()
        return results

    def _score_shared(self, requests, shared: dict[tuple[int, ...], list[int]], done) -> None:
        """Scores groups of requests with one context each through `_score_prefixed`."""
        L = self.max_length
        groups = []
        for ctx, all_ids in shared.items():
            # choices of very different lengths go to different calls (each recomputes the
            # context), so one long choice does not pad all the others to its length
            by_bucket: dict[int, list[int]] = defaultdict(list)
            for i in all_ids:
                by_bucket[bucket_length(len(requests[i][2]), L)].append(i)
            for tc, ids in by_bucket.items():
                choices = max(1, 1 << (len(ids) - 1).bit_length())
                groups.append((choices, bucket_length(len(ctx) - 1, L), tc, ctx, ids))
        groups.sort(key=lambda g: (g[0], g[2], g[1]), reverse=True)
        rows_per_batch = 4 * self.batch_size
        start = 0
        while start < len(groups):
            choices, tp, tc = groups[start][:3]
            docs = max(1, rows_per_batch // choices)
            batch = [g for g in groups[start:start + docs] if g[0] == choices]
            start += len(batch)
            tp = max(g[1] for g in batch)
            tc = max(g[2] for g in batch)
            if tp + tc > L:  # the two buckets together may pass the context: use exact lengths
                tp = max(len(g[3]) - 1 for g in batch)
                tc = max(max(len(requests[i][2]) for i in g[4]) for g in batch)
            docs = min(docs, 1 << (len(batch) - 1).bit_length())  # a short tail pads less
            prefix = np.zeros((docs, tp), np.int32)
            prefix_len = np.zeros((docs,), np.int32)
            rows = np.zeros((docs * choices, tc), np.int32)
            targets = np.zeros((docs * choices, tc), np.int32)
            for d, (_, _, _, ctx, ids) in enumerate(batch):
                prefix[d, :len(ctx) - 1] = ctx[:-1]
                prefix_len[d] = len(ctx) - 1
                for k, i in enumerate(ids):
                    cont = requests[i][2]
                    r = d * choices + k
                    rows[r, :len(cont)] = [ctx[-1], *cont[:-1]]
                    targets[r, :len(cont)] = cont
            lp, top = self._scorer.prefixed(prefix, prefix_len, rows, targets)
            for d, (_, _, _, ctx, ids) in enumerate(batch):
                for k, i in enumerate(ids):
                    r, n = d * choices + k, len(requests[i][2])
                    done(i, float(lp[r, :n].sum(dtype=np.float64)),
                         bool(np.all(top[r, :n] == targets[r, :n])))

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
