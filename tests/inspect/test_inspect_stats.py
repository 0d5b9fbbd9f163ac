"""inspect.stats: exact zeros per matrix, and the pattern of what was pruned (N:M, structured,
unstructured, dense) read from the mask or the weights."""

import numpy as np
import pytest
from inspect_common import build, n_of_m_mask, tiny

from nnxprune.inspect.stats import (DENSE, NM, STRUCTURED, UNSTRUCTURED, detect_nm, kernel_stats,
                                    linear_stats)


def test_two_four_mask_is_exact_and_detected():
    model = build(tiny())
    lin = model.layers[0].mlp.up_proj
    mask = n_of_m_mask(lin.kernel[...], 2, 4)
    lin.set_mask(mask)
    s = linear_stats(lin)
    assert s.zeros == lin.kernel.size // 2 and s.sparsity == 0.5
    assert (s.pattern, s.nm) == (NM, (2, 4))
    assert s.sparsity_label == "50.0%, 2:4"
    assert s.label == "64x128, 8,192 params, 50.0%, 2:4"
    assert s.zero_rows == s.zero_cols == 0 and s.masked


def test_random_unstructured_mask_exact_fraction():
    model = build(tiny())
    lin = model.layers[1].self_attn.q_proj
    mask = np.random.default_rng(0).random(lin.kernel.shape) >= 0.3
    lin.set_mask(mask)
    s = linear_stats(lin)
    assert s.zeros == int((~mask).sum())            # the weights themselves have no exact zeros
    assert s.sparsity == (~mask).sum() / mask.size
    assert s.pattern == UNSTRUCTURED and s.nm is None
    assert s.sparsity_label == f"{100 * (~mask).mean():.1f}%, unstructured"


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (1, 8), (3, 8), (4, 8)])
def test_tightest_n_of_m(n, m):
    kernel = np.random.default_rng(n * 10 + m).standard_normal((64, 48)).astype(np.float32)
    s = kernel_stats(kernel, n_of_m_mask(kernel, n, m))
    # The mask keeps n of every m, i.e. prunes m - n: pattern (m-n):m in the library's convention
    # (N pruned of M). Keeping 1 of 4 also holds as 6:8 (ties go to the smaller M); keeping 1 of
    # 8 also holds as 3:4 (looser); a top-4-of-8 mask on random weights is not 2:4 everywhere.
    assert (s.pattern, s.nm) == (NM, (m - n, m))
    assert s.sparsity == 1 - n / m


def test_two_four_is_not_reported_as_four_eight():
    zero = np.zeros((16, 4), bool)
    zero.reshape(4, 4, 4)[:, :2] = True                 # 2:4 everywhere, hence also 4:8
    assert detect_nm(zero) == (2, 4)


def test_very_sparse_random_is_not_n_of_m():
    """90% random zeros satisfy some loose N:8 everywhere, but that is not what the mask is."""
    kernel = np.ones((512, 256), np.float32)
    mask = np.random.default_rng(1).random(kernel.shape) >= 0.9
    s = kernel_stats(kernel, mask)
    assert s.pattern == UNSTRUCTURED and s.zeros == int((~mask).sum())


def test_structured_heads_and_channels():
    model = build(tiny())
    q = model.layers[0].self_attn.q_proj               # out: 4 heads x 16
    keep = np.ones(q.kernel.shape, bool)
    keep[:, 16:32] = False                              # head 1 of 4
    q.set_mask(keep)
    s = linear_stats(q)
    assert (s.pattern, s.zero_cols, s.zero_rows) == (STRUCTURED, 16, 0)
    assert s.sparsity_label == "25.0%, structured (1/4 heads out)"
    down = model.layers[0].mlp.down_proj                # in: mlp 128
    keep = np.ones(down.kernel.shape, bool)
    keep[:32] = False
    down.set_mask(keep.astype(np.float32))              # a float mask counts the same
    s = linear_stats(down)
    assert (s.pattern, s.zero_rows, s.zeros) == (STRUCTURED, 32, 32 * 64)
    assert s.sparsity_label == "25.0%, structured (32/128 in)"


def test_dense_and_incidental_zeros():
    kernel = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    assert (kernel_stats(kernel).pattern, kernel_stats(kernel).sparsity_label) == (DENSE, "dense")
    kernel[3, 50] = kernel[40, 17] = 0.0                # like a dequantized GGUF's exact zeros
    s = kernel_stats(kernel)
    assert s.pattern == DENSE and s.zeros == 2
    assert s.sparsity_label.startswith("dense (")
    kernel[:, :8] = 0.0                                 # structured, with the stray zeros beside it
    s = kernel_stats(kernel)
    assert s.pattern == STRUCTURED and s.zero_cols == 8 and s.zeros == 8 * 64 + 2
    assert kernel_stats(np.zeros((8, 8))).sparsity_label == "100.0%, all zero"


def test_pattern_follows_the_mask_count_follows_the_weights():
    kernel = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    mask = n_of_m_mask(kernel, 2, 4)
    stray = np.argwhere(mask)[:5]                       # kept weights that are exactly zero
    kernel[stray[:, 0], stray[:, 1]] = 0.0
    s = kernel_stats(kernel, mask)
    assert (s.pattern, s.nm) == (NM, (2, 4))
    assert s.zeros == kernel.size // 2 + 5
    all_kept = kernel_stats(kernel, np.ones(kernel.shape, bool))
    assert all_kept.pattern == DENSE and all_kept.zeros == 5
