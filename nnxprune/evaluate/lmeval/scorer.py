"""The model side of lm-eval scoring: packed rows through the decoder, the head on scored tokens.

`Scorer(model).packed(...)` runs packed rows of trees (`lmeval.packing`) through the model's own
layer loop (`Llama.run_layers`), one jitted call per decoder layer, with the tree attention kernel
(`models.attention.tree_attention`) plugged into the model's own `DecoderLayer`; then the output
head on the scored positions only. It records the distinct input shapes it ran (`shapes`, each one
compilation per distinct layer shape) and the token counts it ran (`tokens`, `head_rows`).

Example:
    >>> scorer = Scorer(model)
    >>> lp, greedy = scorer.packed(b.tokens, b.positions, b.segment, b.branch, b.row, b.pos,
    ...                            b.targets)        # b: a `packing.Batch`; [M] each
    >>> scorer.shapes                                # {("packed", (1, 512)), ("head", 128)}
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxprune.evaluate.head import head_logprobs
from nnxprune.models.attention import tree_attention

HEAD_ROWS, HEAD_ROWS_SMALL = 512, 128  # the output head's two chunk sizes (see Scorer._score)

# --- the jitted pieces --------------------------------------------------------------------------
# The model runs one decoder layer per call: jit compiles one program per layer *shape* and input
# shape (all layers of a dense model share it; `graphdef` is a static argument, so an equal layer
# of another model shares it too), not one program the size of the whole unrolled model
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


class Scorer:
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
