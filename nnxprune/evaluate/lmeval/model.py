"""`NnxpruneLM`: the `nnxprune` model for lm-eval, registered in lm-eval's model registry on import.

An `lm_eval.api.model.TemplateLM` that runs any model nnxprune can load (card name, HF folder,
GGUF, nnxprune checkpoint; dense, masked or surgically pruned) and gives the numbers lm-eval's
`hf` model gives for the same weights:

- tokenization is lm-eval's own (`TemplateLM.loglikelihood` / `_encode_pair`), `tok_encode`
  follows the `hf` model (special tokens as the tokenizer adds them, no second BOS), the prefix
  token for an empty context is BOS (else EOS), and rolling windows are lm-eval's
  (`get_rolling_token_windows`, context 1);
- scoring is exact: the log-probability of every continuation token under the model, in float32,
  requests packed as trees (`lmeval.packing`) and run by `lmeval.scorer`;
- `generate_until` is greedy (or sampled when a task asks) with nnxprune's jitted KV-cache
  decoder; the text is cut at the first stop sequence as lm-eval's `hf` model cuts it.

Example:
    >>> lm = NnxpruneLM("smollm2-135m", batch_size=8)      # or NnxpruneLM(loaded=loaded)
    >>> lm.loglikelihood(requests)                        # [(logprob, is_greedy), ...]
    >>> # from lm-eval: --model nnxprune --model_args model=smollm2-135m
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from nnxprune import interrupt
from nnxprune.errors import UserError
from nnxprune.evaluate.lmeval import packing
from nnxprune.evaluate.lmeval.scorer import Scorer


@register_model("nnxprune")
class NnxpruneLM(TemplateLM):
    """lm-eval model over an nnxprune model. `model` is anything `nnxprune.io.load.load_model`
    takes; or pass `loaded=` (a `LoadedModel`) from Python. A call takes about
    `batch_size * packing.ROW_TOKENS` tokens (`batch_size` rows of 256 tokens); `max_length` is the
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
        self._scorer = Scorer(self.model)
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

        Requests go as trees packed into rows, a call's rows of one length (`packing.batches`)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        self.request_tokens += sum(min(len(ctx) + len(cont), self.max_length + 1) - 1
                                   for _, ctx, cont in requests)
        pbar = tqdm(total=len(requests), desc="nnxprune loglikelihood", disable=disable_tqdm)
        for batch in packing.batches(requests, self.max_length, self.batch_size):
            interrupt.stop_if_requested()  # a safe point: between batches
            lp, greedy = self._scorer.packed(batch.tokens, batch.positions, batch.segment,
                                             batch.branch, batch.row, batch.pos, batch.targets)
            pbar.update(self._collect(requests, batch.owner, lp, greedy, results))
        pbar.close()
        return results

    def _collect(self, requests, owner: np.ndarray, lp: np.ndarray, greedy: np.ndarray,
                 results) -> int:
        """Sums the token log-probabilities `lp [M]` (greedy flags `greedy [M]`) of each request
        in `owner [M]` into `results` (and lm-eval's cache); returns how many requests."""
        ids, which = np.unique(owner, return_inverse=True)
        score = np.zeros(len(ids))
        np.add.at(score, which, lp.astype(np.float64))
        misses = np.zeros(len(ids), np.int64)
        np.add.at(misses, which, ~greedy)
        for i, total, miss in zip(ids.tolist(), score, misses):
            results[i] = (float(total), bool(miss == 0))
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return len(ids)

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
