"""Tokenizing text into int32 id arrays, the one way calibration, evaluation and recovery do it.

Example:
    >>> ids = encode(tokenizer, "The tower is 324 metres tall.")                  # defaults
    >>> ids = encode(tokenizer, text, add_special_tokens=False)                    # no BOS
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nnxprune.errors import UserError


def encode(tokenizer: Any, text: str, **kwargs: Any) -> np.ndarray:
    """`tokenizer(text, **kwargs).input_ids` as a 1-D int32 array (a Hugging Face tokenizer)."""
    # verbose=False: texts longer than the model's context are expected here
    ids = tokenizer(text, verbose=False, **kwargs)["input_ids"]
    return as_token_ids(np.asarray(ids, dtype=np.int64).reshape(-1))


def as_token_ids(ids: np.ndarray) -> np.ndarray:
    """`ids` as int32; UserError when a value is negative or beyond int32."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise UserError("token ids do not fit in int32")
    return ids.astype(np.int32)
