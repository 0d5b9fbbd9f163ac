"""Instruction data for LoRA recovery (LLM-Pruner's stage 2): Alpaca template, one record per
window, prompt and padding masked from the loss, bad records rejected before any work."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recovery_common import CFG, tiny_model

from nnxprune.data.training import (ALPACA_INPUT, ALPACA_NO_INPUT, alpaca_prompt, instruction_window,
                                    instruction_windows, read_instructions)
from nnxprune.errors import UserError
from nnxprune.recovery import RecoveryConfig
from nnxprune.recovery.losses import forward, input_ids, next_token_ce
from nnxprune.recovery.trainer import train

EOS = 0


class CharTokenizer:
    """One id per character (1..120), EOS 0: prompts are exact prefixes of the full texts."""

    eos_token_id = EOS

    def __call__(self, text, verbose=False, add_special_tokens=True):
        return {"input_ids": [ord(c) % 120 + 1 for c in text]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else f"n={i}",
            "output": f"{2 * i}"} for i in range(40)]


def test_alpaca_template_with_and_without_input():
    assert alpaca_prompt({"instruction": "Say hi.", "input": "", "output": "hi"}) == \
        ALPACA_NO_INPUT.format(instruction="Say hi.")
    assert alpaca_prompt({"instruction": "Sum.", "input": "1 2", "output": "3"}).endswith(
        "### Instruction:\nSum.\n\n### Input:\n1 2\n\n### Response:\n")
    assert ALPACA_INPUT.startswith("Below is an instruction that describes a task, paired with an input")


def test_window_masks_prompt_and_padding_only():
    tok = CharTokenizer()
    rec = {"instruction": "Say hi.", "output": "hello"}
    n_prompt = len(alpaca_prompt(rec))
    w = instruction_window(tok, rec, seqlen=200)
    targets = w >= 0
    assert not targets[:n_prompt].any()
    assert targets[n_prompt:n_prompt + 6].all() and w[n_prompt + 5] == EOS  # "hello" + EOS
    assert not targets[n_prompt + 6:].any()
    np.testing.assert_array_equal(np.asarray(input_ids(jnp.asarray(w[:n_prompt]))),
                                  [ord(c) % 120 + 1 for c in alpaca_prompt(rec)])


def test_cross_entropy_counts_response_tokens_only():
    model = tiny_model(masked=False)
    tok = CharTokenizer()
    w = jnp.asarray(np.stack([instruction_window(tok, RECORDS[i], 224) for i in (0, 1)]))
    logits = forward(model, w).logits
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    ids, keep = np.asarray(input_ids(w))[:, 1:], np.asarray(w)[:, 1:] >= 0
    nll = -np.take_along_axis(np.asarray(logp), ids[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(float(next_token_ce(logits, w)), nll[keep].mean(), rtol=1e-5)
    assert 0 < keep.sum() < keep.size / 4


def test_lora_trains_on_instruction_records(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", RECORDS)
    cfg = RecoveryConfig.from_dict({
        "kind": "lora", "dataset": str(path), "prompt_template": "alpaca", "steps": 12,
        "batch_size": 4, "seqlen": 224, "lr": 3e-3, "warmup_steps": 1, "eval_every": 0,
        "eval_batches": 1, "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.05}})
    cfg.check(CFG)
    result = train(tiny_model(masked=False), cfg, tokenizer=CharTokenizer(), progress=False)
    assert result.data["train_windows"] == 36 and result.data["heldout_windows"] == 4
    assert result.losses[-1] < result.losses[0]


def test_bad_records_and_settings_fail_before_work(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"instruction": "no output here"}])
    with pytest.raises(UserError, match=r"line 2: .*missing: output"):
        read_instructions(bad)
    cfg = RecoveryConfig.from_dict({"kind": "lora", "dataset": str(bad), "prompt_template": "alpaca",
                                    "seqlen": 64})
    with pytest.raises(UserError, match=r"line 2"):
        cfg.check(CFG)
    with pytest.raises(UserError, match="reads a .jsonl file"):
        RecoveryConfig.from_dict({"kind": "lora", "dataset": "c4", "prompt_template": "alpaca"})
    with pytest.raises(UserError, match="did you mean 'alpaca'"):
        RecoveryConfig.from_dict({"kind": "lora", "dataset": str(bad), "prompt_template": "alpacca"})
    few = write_jsonl(tmp_path / "few.jsonl", RECORDS[:2])
    with pytest.raises(UserError, match="none left for training"):
        instruction_windows(CharTokenizer(), few, seqlen=64, train_windows=4, heldout_windows=2)
