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
Tokens are embedded on the host, and the output head runs only on the scored positions, gathered
into chunks of fixed row counts, so neither adds compiled shapes (about a third of the
compilation time of a 200-document task before). The head's greedy check is a masked max, not
an argmax (see `evaluate.head`).
`generate_until` is greedy (or sampled when a task asks) with nnxprune's jitted KV-cache decoder;
the text is cut at the first stop sequence as lm-eval's `hf` model cuts it.

lm-eval 0.4.13 has no plugin discovery for models: `nnxprune` is registered in lm-eval's model
registry when this module is imported. `nnxprune lm-eval ...` does that, and so does
`python -m nnxprune.evaluate.lmeval ARGS` (lm-eval's own command line, e.g. `run --model nnxprune
--model_args model=smollm2-135m --tasks ...`). torch is not needed on this path.
"""

from __future__ import annotations

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
from nnxprune.models import llama as llama_lib

__all__ = ["NnxpruneLM", "bucket_length", "fine_length", "run_tasks", "results_table"]

ROW_TOKENS = 256  # tokens per row of `batch_size` a shared-context call may hold (see _score_shared)
CHUNK_KV_BYTES = 1 << 30  # keys and values one chunk of shared contexts may hold (see _score_shared)
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
    """A finer padded length for the contexts and continuations of multiple-choice requests:
    powers of two up to 16, then four steps per octave (20, 24, 28, 32, 40, 48, 56, 64, 80, ...),
    so padding wastes at most a fifth (about a ninth on average). Each length is one more
    compilation (of a single decoder layer, ~0.3 s), repaid within a few hundred requests."""
    if n <= 16:
        return bucket_length(n)
    step = _pow2_floor(n - 1) // 4
    return -(-n // step) * step


# --- the jitted pieces --------------------------------------------------------------------------
# The model runs one decoder layer per call: jit compiles one program per layer *shape* and input
# shape (all layers of a dense model share it; `graphdef` is a static argument, so an equal layer
# of another NnxpruneLM shares it too), not one program the size of the whole unrolled model.
# A compilation then takes about 0.3 s instead of ~10 s for SmolLM2, so length buckets can be fine
# (little padding) and still cost little to compile. The Python loop over layers adds a few
# milliseconds of dispatch per call of thousands of tokens.
#
# The layer math is the model's own (`DecoderLayer.__call__`: its norms, projections, RoPE and
# attention helpers) with tokens flattened to 2-D `[B*T, E]` around the projections and the MLP:
# XLA on CPU runs the SwiGLU MLP about 25% faster on a 2-D input than on a 3-D one.


def _static_jit(fn):
    return jax.jit(fn, static_argnums=0)


def _qkv(attn, h, b, t, positions, inv_freq):
    """Queries `[B, T, K, G, Dh]` and keys, values `[B, T, K, Dh]` of normed `h [B*T, E]`."""
    n, k, dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = llama_lib.apply_rope(attn.q_proj(h).reshape(b, t, n, dh), positions, inv_freq)
    keys = llama_lib.apply_rope(attn.k_proj(h).reshape(b, t, k, dh), positions, inv_freq)
    return q.reshape(b, t, k, n // k, dh), keys, attn.v_proj(h).reshape(b, t, k, dh)


def _finish(layer, x, out):
    """The rest of the layer after attention: `x [N, E]`, attention output `out` (N rows)."""
    x = x + layer.self_attn.o_proj(out.reshape(x.shape[0], -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _causal_layer(layer, x, inv_freq):
    """One decoder layer on whole rows `x [B, T, E]` from position 0, and its keys and values."""
    b, t, e = x.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = x.reshape(b * t, e)
    q, keys, values = _qkv(layer.self_attn, layer.input_layernorm(x), b, t, positions, inv_freq)
    if t > llama_lib.ATTN_BLOCK:
        out = llama_lib._blocked_causal_attention(q, keys, values, positions)
    else:
        out = llama_lib._attention(q, keys, values, positions, positions)
    return _finish(layer, x, out).reshape(b, t, e), keys, values


@_static_jit
def _layer(graphdef, state, x, inv_freq):
    """One decoder layer on whole rows `x [B, T, E]` (causal, positions from 0)."""
    return _causal_layer(nnx.merge(graphdef, state), x, inv_freq)[0]


@_static_jit
def _layer_context(graphdef, state, x, inv_freq):
    """One decoder layer on contexts `x [D, Tp, E]`; also returns their keys and values."""
    return _causal_layer(nnx.merge(graphdef, state), x, inv_freq)


@_static_jit
def _layer_continue(graphdef, state, x, ctx_keys, ctx_values, row_ctx, ctx_len, inv_freq):
    """One decoder layer on rows `x [R, Tc, E]` that continue contexts whose keys and values
    (`[D, Tp, K, Dh]`, this layer's) were computed before: row `r` continues context `row_ctx[r]`
    from position `ctx_len[r]` (its first token is the context's last one).

    A row's query at position `p + j` attends to the context keys `0 .. p-1` and to the row's own
    keys `p .. p+j`: exactly the keys, values and positions it sees as one long row, but every
    context is computed once for all its rows. A context's padding keys are masked; a row's
    padding sits after its real tokens, where no real query looks."""
    layer = nnx.merge(graphdef, state)
    r, tc, e = x.shape
    tp = ctx_keys.shape[1]
    positions = ctx_len[:, None] + jnp.arange(tc)[None, :]  # [R, Tc]
    x = x.reshape(r * tc, e)
    q, keys, values = _qkv(layer.self_attn, layer.input_layernorm(x), r, tc, positions, inv_freq)
    # the G query heads of a KV head folded into the rows of one matmul against the row's context
    # keys and its own keys side by side (one score matmul, one value matmul: 25% faster on CPU
    # than separate context and own-key products), scores and softmax in float32
    _, _, k, g, dh = q.shape
    rows = (q * (1.0 / math.sqrt(dh))).transpose(0, 2, 1, 3, 4).reshape(r, k, tc * g, dh)
    keys = jnp.concatenate([ctx_keys[row_ctx], keys.astype(ctx_keys.dtype)], axis=1)
    values = jnp.concatenate([ctx_values[row_ctx], values.astype(ctx_values.dtype)], axis=1)
    scores = jnp.einsum("rkqh,rskh->rkqs", rows, keys.astype(rows.dtype),
                        preferred_element_type=jnp.float32)  # [R, K, Tc*G, Tp+Tc]
    s_idx = jnp.arange(tp + tc)
    q_idx = jnp.repeat(jnp.arange(tc), g)  # the position in the row of every query row
    visible = jnp.where(s_idx[None, None, :] < tp,
                        (s_idx[None, :] < ctx_len[:, None])[:, None, :],  # the context's real keys
                        s_idx[None, None, :] - tp <= q_idx[None, :, None])  # own keys, causal
    probs = jax.nn.softmax(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("rkqs,rskh->rkqh", probs.astype(values.dtype), values)
    out = out.reshape(r, k, tc, g, dh).transpose(0, 2, 1, 3, 4)  # [R, Tc, K, G, Dh]
    return _finish(layer, x, out).reshape(r, tc, e)


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
        self.graphdef, self.state = nnx.split(model)
        self.layers = [nnx.split(layer) for layer in model.layers]
        self.inv_freq = model.inv_freq
        self.embedding = np.asarray(model.embed_tokens.effective_embedding())
        self.shapes: set[tuple] = set()

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
            outs.append(_head_rows(self.graphdef, self.state, hc, tc))  # dispatched, not awaited
            i += c
        if not outs:
            return np.zeros((0,), np.float32), np.zeros((0,), bool)
        return (np.concatenate([np.asarray(lp) for lp, _ in outs])[:m],
                np.concatenate([np.asarray(g) for _, g in outs])[:m])

    def rows(self, tokens, row, pos, targets):
        """Whole rows `tokens [B, T]` from position 0: log-probabilities and greedy flags of
        `targets [M]` at positions `pos [M]` of rows `row [M]`."""
        self.shapes.add(("rows", tokens.shape))
        x = self._embed(tokens)
        for graphdef, state in self.layers:
            x = _layer(graphdef, state, x, self.inv_freq)
        return self._score(np.asarray(x)[row, pos], targets)

    def contexts(self, tokens):
        """Contexts `tokens [D, Tp]`: every layer's keys and values, `[D, Tp, K, Dh]` each."""
        self.shapes.add(("contexts", tokens.shape))
        x = self._embed(tokens)
        kv = []
        for graphdef, state in self.layers:
            x, keys, values = _layer_context(graphdef, state, x, self.inv_freq)
            kv.append((keys, values))
        return kv

    def continuations(self, kv, row_ctx, ctx_len, tokens, row, pos, targets):
        """Rows `tokens [R, Tc]` continuing the contexts of `kv` (see `_layer_continue`):
        log-probabilities and greedy flags of `targets [M]` at positions `pos` of rows `row`."""
        self.shapes.add(("continuations", kv[0][0].shape[:2], tokens.shape) if kv else tokens.shape)
        x = self._embed(tokens)
        for (graphdef, state), (keys, values) in zip(self.layers, kv, strict=True):
            x = _layer_continue(graphdef, state, x, keys, values, row_ctx, ctx_len, self.inv_freq)
        return self._score(np.asarray(x)[row, pos], targets)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _bucket_run(lengths: list[int], start: int, budget: int) -> tuple[int, int]:
    """For items sorted longest first: the `fine_length` bucket of item `start` and how many
    items from there share it, at most a power of two that keeps bucket x count within `budget`
    tokens (one call's rows)."""
    length = fine_length(lengths[start])
    most = _pow2_floor(max(1, budget // length))
    count = 1
    while (count < most and start + count < len(lengths)
           and fine_length(lengths[start + count]) == length):
        count += 1
    return length, count


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
        """`requests`: `(key, context_ids, continuation_ids)`; returns `(logprob, is_greedy)`.

        Requests whose context has other requests (the choices of a question) go through
        `_score_shared`; the rest (rolling windows, lone requests) as whole rows here."""
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
        # whole rows: requests whose inputs coincide (they differ in their last token only) share
        # a row and are scored together at its last position
        rows: dict[tuple[int, ...], list[tuple[int, int, int]]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if i not in in_shared:
                whole = (list(ctx) + list(cont))[-(L + 1):]
                rows[tuple(whole[:-1])].append((i, min(len(cont), len(whole) - 1), whole[-1]))
        order = sorted(rows, key=lambda r: (-len(r), r))  # longest first: worst memory up front
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            B = min(self.batch_size, _pow2_ceil(len(batch)))
            T = bucket_length(len(batch[0]), L)
            tokens = np.zeros((B, T), np.int32)
            row, pos, targets, spans = [], [], [], []
            for b, inp in enumerate(batch):
                n = len(inp)
                tokens[b, :n] = inp
                # positions n - span .. n - 2 score the row's own next tokens (shared by its
                # requests); position n - 1 scores every request's last token
                span = max(n_cont for _, n_cont, _ in rows[inp])
                spans.append((len(targets), span))
                row += [b] * (span - 1 + len(rows[inp]))
                pos += list(range(n - span, n - 1)) + [n - 1] * len(rows[inp])
                targets += list(inp[n - span + 1:]) + [tok for _, _, tok in rows[inp]]
            lp, greedy = self._scorer.rows(tokens, np.array(row), np.array(pos),
                                           np.array(targets, np.int32))
            for inp, (base, span) in zip(batch, spans):
                end = base + span - 1  # the first last-token entry
                for k, (i, n_cont, _) in enumerate(rows[inp]):
                    lo = end - (n_cont - 1)
                    done(i, float(lp[lo:end].sum(dtype=np.float64) + lp[end + k]),
                         bool(greedy[lo:end].all() and greedy[end + k]))
        pbar.close()
        return results

    def _score_shared(self, requests, shared: dict[tuple[int, ...], list[int]], done) -> None:
        """Scores the requests of shared contexts: each context (without its last token) once
        into every layer's keys and values, then its continuations as rows that attend to them
        (`_Scorer.contexts`, `_Scorer.continuations`).

        Contexts go in chunks, shortest first, whose keys and values (padded to the chunk's
        longest context; they stay in memory while the chunk is scored) fit in `CHUNK_KV_BYTES`
        (at least one call's worth of tokens). Few chunks mean few compiled shapes: a
        continuation call's shape includes its chunk's. A chunk's
        continuations, whatever their context, are sorted by length and cut into calls of about
        `ROW_TOKENS * batch_size` tokens, so a row pads only to its length bucket, and large
        chunks leave few calls part-filled."""
        per_token = sum(2 * layer.self_attn.num_kv_heads * layer.self_attn.head_dim
                        for layer in self.model.layers) * self.model.embed_tokens.embedding.dtype.itemsize
        budget = max(ROW_TOKENS * self.batch_size, CHUNK_KV_BYTES // max(1, per_token))
        chunk: list[tuple[int, ...]] = []
        for ctx in sorted(shared, key=len):
            if chunk and len(chunk) + 1 > _pow2_floor(budget // fine_length(len(ctx) - 1)):
                self._score_chunk(requests, chunk, shared, done)
                chunk = []
            chunk.append(ctx)
        if chunk:
            self._score_chunk(requests, chunk, shared, done)

    def _context_kv(self, chunk: list[tuple[int, ...]]) -> list[tuple[jax.Array, jax.Array]]:
        """Every layer's keys and values `[D, Tp, K, Dh]` of the contexts in `chunk` (sorted
        longest first; each without its last token), in `chunk`'s order.

        A call takes the contexts of one length bucket (`fine_length`, at most `ROW_TOKENS *
        batch_size` tokens), its row count rounded up to a bucket with the next shorter contexts
        (cheaper than rows of zeros; only the last call pads with zeros), so a short context is
        not padded to the longest and a task compiles a few shapes; the results are padded to the
        longest and stacked."""
        budget = ROW_TOKENS * self.batch_size
        parts, start = [], 0
        lengths = [len(ctx) - 1 for ctx in chunk]
        while start < len(chunk):
            length, count = _bucket_run(lengths, start, budget)
            run = chunk[start:start + bucket_length(count)]
            tokens = np.zeros((bucket_length(count), length), np.int32)
            for d, ctx in enumerate(run):
                tokens[d, :len(ctx) - 1] = ctx[:-1]
            parts.append((len(run), self._scorer.contexts(tokens)))
            start += len(run)
        tp = parts[0][1][0][0].shape[1]

        def stack(arrays):  # on the host: device-side pads would compile one program per shape
            first = arrays[0][1]
            out = np.zeros((bucket_length(len(chunk)), tp) + first.shape[2:], first.dtype)
            d = 0  # rows past the contexts stay zeros (a bucketed count: few compiled shapes)
            for n, a in arrays:
                out[d:d + n, :a.shape[1]] = np.asarray(a)[:n]
                d += n
            return jnp.asarray(out)

        return [(stack([(n, kv[i][0]) for n, kv in parts]), stack([(n, kv[i][1]) for n, kv in parts]))
                for i in range(len(self._scorer.layers))]

    def _score_chunk(self, requests, chunk, shared, done) -> None:
        budget = ROW_TOKENS * self.batch_size
        chunk = chunk[::-1]  # longest context first (see _context_kv)
        kv = self._context_kv(chunk)
        # (request, context index), longest continuation first; a call takes the rows of one
        # length bucket (at most `budget` tokens), and its padding rows, if any, go to the next
        # shorter rows (cheaper than rows of zeros)
        rows = sorted(((i, d) for d, ctx in enumerate(chunk) for i in shared[ctx]),
                      key=lambda row: -len(requests[row[0]][2]))
        lengths = [len(requests[i][2]) for i, _ in rows]
        start = 0
        while start < len(rows):
            tc, count = _bucket_run(lengths, start, budget)
            n_rows = bucket_length(count)
            batch = rows[start:start + n_rows]
            start += len(batch)
            tokens = np.zeros((n_rows, tc), np.int32)
            row_ctx = np.zeros((n_rows,), np.int32)
            ctx_len = np.zeros((n_rows,), np.int32)
            for r, (i, d) in enumerate(batch):
                ctx, cont = chunk[d], requests[i][2]
                tokens[r, :len(cont)] = [ctx[-1], *cont[:-1]]
                row_ctx[r], ctx_len[r] = d, len(ctx) - 1
            conts = [requests[i][2] for i, _ in batch]
            row = np.repeat(np.arange(len(batch)), [len(c) for c in conts])
            pos = np.concatenate([np.arange(len(c)) for c in conts])
            targets = np.concatenate([np.asarray(c, np.int32) for c in conts])
            lp, greedy = self._scorer.continuations(kv, row_ctx, ctx_len, tokens, row, pos, targets)
            bounds = np.cumsum([0] + [len(c) for c in conts])
            for r, (i, _) in enumerate(batch):
                lo, hi = bounds[r], bounds[r + 1]
                done(i, float(lp[lo:hi].sum(dtype=np.float64)), bool(greedy[lo:hi].all()))

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
