"""Text generation with a KV cache: one jitted prefill, then one jitted `while_loop` for decoding.

Greedy by default (`temperature=0`); sampling with temperature, top-k and top-p otherwise, seeded
through `jax.random`. Batch size 1. The model is jitted through `nnx.split`: the graphdef is
static and the state an argument, and compiled functions are kept per (graphdef, shapes), so a
second call on the same model (and another prompt of similar length) compiles nothing. Prompt and
cache lengths are rounded up to multiples of `BUCKET` for the same reason.

Example:
    >>> loaded = load_model("smollm2-135m")
    >>> out = generate_text(loaded.model, loaded.tokenizer, "The capital of France is",
    ...                     max_new_tokens=24)
    >>> out.text.split()[0], out.tokens_per_second   # decode throughput, compile excluded
    ('Paris.', 33.0)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.models.llama import Llama, init_cache

BUCKET = 64  # prompt and cache lengths are rounded up to a multiple of this (fewer recompiles)
_COMPILED: dict[Any, Any] = {}  # (name, graphdef, statics, argument shapes) -> compiled function
_MAX_COMPILED = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """New tokens (EOS included when it stopped there) and timings. `tokens_per_second` is the
    decode loop's throughput: the first new token comes from the prefill, the rest from the loop."""

    tokens: list[int]
    text: str | None
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    tokens_per_second: float


def _pick(logits, key, temperature, top_p, how: tuple[bool, int | None, bool]):
    """Next token from float32 logits `[V]`. `how = (sample, top_k, nucleus)` is static: argmax,
    or a draw after temperature, top-k, top-p (in that order, as in transformers: top-p on the
    top-k renormalised distribution). Only top-k/top-p pay for a (partial) sort of the vocab."""
    sample, top_k, nucleus = how
    if not sample:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits / temperature
    if not (top_k or nucleus):
        return jax.random.categorical(key, logits).astype(jnp.int32)
    values, index = jax.lax.top_k(logits, top_k or logits.shape[0])  # descending
    if nucleus:
        probs = jax.nn.softmax(values)
        values = jnp.where(jnp.cumsum(probs) - probs < top_p, values, -jnp.inf)  # keeps the first
    return index[jax.random.categorical(key, values)].astype(jnp.int32)


def _prefill(graphdef, how, state, tokens, length, cache, key, temperature, top_p):
    """Runs the (padded) prompt through the model; samples the first new token at `length - 1`.

    Padding sits after the prompt at positions `length, length+1, ...`, so its keys land in cache
    slots no real query sees yet (the mask is `slot <= position`), and decode step `p` overwrites
    slot `p` before it attends to it: the garbage is never read."""
    model = nnx.merge(graphdef, state)
    positions = jnp.arange(tokens.shape[1])[None]
    h, cache = model.hidden_states(tokens, positions, cache)
    last = jax.lax.dynamic_index_in_dim(h, length - 1, axis=1)  # [1, 1, D]
    logits = model.logits(last)[0, 0].astype(jnp.float32)
    return _pick(logits, jax.random.fold_in(key, 0), temperature, top_p, how), cache


def _decode(graphdef, how, state, cache, first, length, max_new, eos_ids, key, temperature, top_p):
    """Feeds one token at a time until `max_new` tokens or an EOS; returns (buffer, count)."""
    model = nnx.merge(graphdef, state)
    buf = jnp.zeros(cache[0][0].shape[1], jnp.int32).at[0].set(first)  # cache length >= max_new

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new) & ~done

    def body(carry):
        i, tok, cache, _, buf = carry
        pos = jnp.reshape(length + i - 1, (1, 1))  # position of `tok`
        h, cache = model.hidden_states(jnp.reshape(tok, (1, 1)), pos, cache)
        logits = model.logits(h)[0, 0].astype(jnp.float32)
        nxt = _pick(logits, jax.random.fold_in(key, i), temperature, top_p, how)
        return i + 1, nxt, cache, jnp.isin(nxt, eos_ids), buf.at[i].set(nxt)

    init = (jnp.int32(1), first, cache, jnp.isin(first, eos_ids), buf)
    count, _, _, _, buf = jax.lax.while_loop(cond, body, init)
    return buf, count


def _compiled(fn, graphdef, statics, *args) -> tuple[Any, float]:
    """`fn` compiled for these statics and argument shapes (cached), and the seconds it took."""
    leaves, treedef = jax.tree.flatten(args)
    key = (fn.__name__, graphdef, statics, treedef,
           tuple((np.shape(x), str(x.dtype)) for x in leaves))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    start = time.perf_counter()
    compiled = jax.jit(fn, static_argnums=(0, 1)).lower(graphdef, statics, *args).compile()
    if len(_COMPILED) >= _MAX_COMPILED:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - start


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _eos_ids(model, tokenizer, eos_token_id, stop_at_eos: bool) -> np.ndarray:
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if not stop_at_eos or eos is None:
        return np.array([-1], np.int32)  # matches no token
    return np.array([eos] if isinstance(eos, int) else list(eos), np.int32)


def check_options(*, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, context: int | None = None,
                  flag=lambda name: name) -> None:
    """UserError for a generation setting out of range, named by `flag(name)` (the CLI passes
    `--max-new-tokens` style names): what `generate` checks, and `nnxprune generate` before it
    loads any weight. `context` (the model's) leaves room for at least one prompt token."""
    def integer(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    def number(value) -> bool:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

    if not integer(max_new_tokens) or max_new_tokens < 1:
        raise UserError(f"{flag('max_new_tokens')} must be an integer >= 1, got {max_new_tokens!r}")
    if context is not None and max_new_tokens >= context:
        raise UserError(f"{flag('max_new_tokens')} {max_new_tokens} leaves no room for the prompt "
                        f"in the model's context of {context} tokens")
    if not number(temperature) or not 0 <= temperature < float("inf"):
        raise UserError(f"{flag('temperature')} must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not integer(top_k) or top_k < 1):
        raise UserError(f"{flag('top_k')} must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not number(top_p) or not 0 < top_p <= 1):
        raise UserError(f"{flag('top_p')} must be in (0, 1], got {top_p!r}")
    if not integer(seed) or not -2**63 <= seed < 2**63:
        raise UserError(f"{flag('seed')} must be a 64-bit integer, got {seed!r}")


def generate(model: Llama, tokenizer, prompt_ids: Sequence[int], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop_at_eos: bool = True,
             eos_token_id: int | Sequence[int] | None = None) -> GenerationResult:
    """Continues `prompt_ids` (1-D token ids) by up to `max_new_tokens` tokens."""
    cfg = model.config
    ids = np.asarray(prompt_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.size == 0:
        raise UserError("the prompt is empty: give at least one token")
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise UserError(f"prompt_ids must be a 1-D list of token ids in [0, {cfg.vocab_size})")
    check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, seed=seed)
    length, total = len(ids), len(ids) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise UserError(f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                        f"exceeds the model's context of {cfg.max_position_embeddings} tokens")

    cache_len = min(_round_up(total, BUCKET), cfg.max_position_embeddings)
    padded = np.zeros((1, min(_round_up(length, BUCKET), cache_len)), np.int32)
    padded[0, :length] = ids
    graphdef, state = nnx.split(model)
    cache = init_cache(model, 1, cache_len, dtype=model.embed_tokens.embedding.dtype)
    sample = temperature > 0
    how = (sample, min(top_k, cfg.vocab_size) if sample and top_k else None,
           sample and top_p is not None and top_p < 1)
    knobs = (jax.random.key(seed), jnp.float32(temperature if sample else 1.0), jnp.float32(top_p or 1.0))

    prefill, c1 = _compiled(_prefill, graphdef, how, state, padded, jnp.int32(length), cache, *knobs)
    start = time.perf_counter()
    first, cache = jax.block_until_ready(prefill(state, padded, jnp.int32(length), cache, *knobs))
    prefill_seconds = time.perf_counter() - start

    eos = _eos_ids(model, tokenizer, eos_token_id, stop_at_eos)
    args = (state, cache, first, jnp.int32(length), jnp.int32(max_new_tokens), eos, *knobs)
    decode, c2 = _compiled(_decode, graphdef, how, *args)
    start = time.perf_counter()
    buf, count = jax.block_until_ready(decode(*args))
    decode_seconds = time.perf_counter() - start

    tokens = np.asarray(buf)[: int(count)].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    steps = len(tokens) - 1
    return GenerationResult(
        tokens=tokens, text=text, prompt_tokens=length, prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds, compile_seconds=c1 + c2,
        tokens_per_second=steps / decode_seconds if steps else 0.0)


def generate_text(model: Llama, tokenizer, prompt: str, *, chat: bool = False, **kw) -> GenerationResult:
    """Tokenizes `prompt` (as one user turn of the chat template when `chat`) and generates."""
    check_prompt(prompt)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template, which chat (--chat) needs")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt).input_ids
    return generate(model, tokenizer, ids, **kw)


def check_prompt(prompt: str) -> None:
    """UserError unless `prompt` is text that UTF-8 can encode: bytes that were not UTF-8 on the
    command line arrive as lone surrogates (Python's `surrogateescape`), which no tokenizer
    takes."""
    if not isinstance(prompt, str):
        raise UserError(f"the prompt must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = prompt[e.start]
        what = (f"byte {ord(bad) - 0xDC00:#04x}" if 0xDC80 <= ord(bad) <= 0xDCFF
                else f"lone surrogate U+{ord(bad):04X}")
        raise UserError(f"the prompt is not valid UTF-8 text ({what} at character {e.start}); "
                        f"pass it in UTF-8") from None
