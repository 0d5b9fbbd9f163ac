"""Models larger than memory: streamed pruning (`nnxprune prune --stream`) on random-weight
checkpoints of public Llama shapes, peak RSS and seconds per layer (issue 28).

For each shape the script writes a random-weight bf16 checkpoint of the public config (HF
safetensors, one shard per decoder layer plus one for the embedding / norm / head, tensor by
tensor, never the whole model in memory) into a temporary folder outside the repository, adds
SmolLM2's tokenizer (its ids fit every Llama-3 vocabulary) so the command can draw C4
calibration text, runs `nnxprune prune RECIPE --stream` on it in a child process (so the peak
RSS is the run's own, `ru_maxrss`), and deletes the checkpoint and the output.

    python benchmarks/scale.py                                   # 1B, Wanda 50%, 8 x 256 tokens
    python benchmarks/scale.py --shapes 1b,3b --methods wanda@0.5,sparsegpt@2:4

Writes benchmarks/results/scale.json: `rows` (shape, params, dtype, method, calibration,
peak_rss_gb, seconds, seconds_per_layer, finished) and the machine. The predicted peak is
`one layer + activations + fixed overhead` (`predicted_rss_gb`, see `predict`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# the public configs (meta-llama/Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B config.json)
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               tie_word_embeddings=True, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128,
               tie_word_embeddings=True, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               tie_word_embeddings=False, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}


def hf_config(shape: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
            "hidden_act": "silu", **SHAPES[shape]}


def layer_shapes(c: dict) -> dict[str, tuple[int, int]]:
    d, f, dh = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * dh, c["num_key_value_heads"] * dh
    return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f), "input_layernorm": (d,), "post_attention_layernorm": (d,)}


def params_of(c: dict) -> int:
    per_layer = sum(int(np.prod(s)) for s in layer_shapes(c).values())
    head = 0 if c["tie_word_embeddings"] else c["vocab_size"] * c["hidden_size"]
    return (c["num_hidden_layers"] * per_layer + c["vocab_size"] * c["hidden_size"]
            + c["hidden_size"] + head)


def write_checkpoint(folder: Path, c: dict, seed: int = 0) -> None:
    """Random bf16 weights (N(0, 0.02); norms 1), one shard per layer, tensor by tensor."""
    import ml_dtypes
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    n = c["num_hidden_layers"]
    shards = n + 1
    weight_map = {}

    def draw(shape):
        if len(shape) == 1:
            return np.ones(shape, ml_dtypes.bfloat16)
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if i < n:
            keys = {f"model.layers.{i}.{k}.weight": s for k, s in layer_shapes(c).items()}
        else:
            keys = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
                    "model.norm.weight": (c["hidden_size"],)}
            if not c["tie_word_embeddings"]:
                keys["lm_head.weight"] = (c["vocab_size"], c["hidden_size"])
        tensors = {}
        for key, shape in keys.items():  # one shard (at most the embedding) in memory
            tensors[key] = draw(shape)
            weight_map[key] = name
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c, indent=2))


def add_tokenizer(folder: Path) -> None:
    from nnxprune.io.gguf import gguf_tokenizer, smollm2_gguf_path

    gguf_tokenizer(smollm2_gguf_path()).save_pretrained(str(folder))


def predict(c: dict, nsamples: int, seqlen: int, method: str) -> float:
    """Predicted peak RSS in GB: fixed overhead + max(one layer, the embedding) + activations,
    from the config alone (`nnxprune.plan.streamed_memory`, whose docstring states the terms:
    the layer read in bf16 and mapped while read, onloaded in fp32, its masks, a matrix's fp32
    score and keep mask, the bf16 copy written; SparseGPT's Hessians and factors; the host
    activations `3 N T D` fp32; the overhead measured on a tiny model)."""
    from nnxprune import plan
    from nnxprune.io.hf_config import config_from_hf

    kind = method.split("@")[0]
    p = plan.streamed_memory(config_from_hf(c), kind, nsamples=nsamples if kind != "magnitude"
                             else 0, seqlen=seqlen, dtype="float32", input_dtype="bfloat16")
    return p.host_bytes / 1e9


def make_model(shape: str, work: Path) -> tuple[Path, float]:
    """The shape's random bf16 checkpoint with SmolLM2's tokenizer, and the seconds it took."""
    model = work / "model"
    model.mkdir()
    t0 = time.perf_counter()
    write_checkpoint(model, hf_config(shape))
    add_tokenizer(model)
    return model, time.perf_counter() - t0


def run_one(shape: str, method: str, nsamples: int, seqlen: int, work: Path, data_dir,
            model: Path, made: float) -> dict:
    c = hf_config(shape)
    kind, amount = method.split("@")
    setting = f'pattern = "{amount}"' if ":" in amount else f"sparsity = {float(amount)}"
    recipe = work / "recipe.toml"
    recipe.write_text(f'[recipe]\nname = "scale"\n\n[[prune]]\nkind = "{kind}"\n{setting}\n\n'
                      f'[calibration]\ndataset = "c4"\nnsamples = {nsamples}\nseqlen = {seqlen}\n'
                      f'seed = 0\n')
    out, report = work / "out", work / "report.json"
    shutil.rmtree(out, ignore_errors=True)
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "nnxprune.cli", "prune", str(recipe), "--model", str(model),
           "--out", str(out), "--stream", "--json", str(report), "--no-progress",
           "--data-dir", str(data_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = {"shape": f"llama-{shape}", "params": params_of(c), "dtype": "bfloat16",
           "method": method, "calibration": f"{nsamples} x {seqlen} C4 tokens",
           "calibration_tokens": nsamples * seqlen, "finished": proc.returncode == 0,
           "seconds": wall, "checkpoint_write_s": made,
           "predicted_rss_gb": predict(c, nsamples, seqlen, method)}
    if proc.returncode == 0:
        r = json.loads(report.read_text())
        per_layer = r["seconds"]["per_layer"]
        t = r["transforms"][-1]["timings"]
        forwards = t["forward_stats"] + t["forward_pruned"]  # what grows with the tokens
        row.update(peak_rss_gb=r["peak_rss_bytes"] / 1e9, prune_s=r["seconds"]["prune"],
                   seconds_per_layer=float(np.mean(per_layer)),
                   seconds_per_layer_max=float(np.max(per_layer)), sparsity=r["sparsity"],
                   breakdown_s={k: v for k, v in t.items() if k != "per_layer"},
                   output_gb=sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e9,
                   projected_128x2048_s=r["seconds"]["prune"] + forwards
                   * (128 * 2048 / (nsamples * seqlen) - 1))
    else:
        row["error"] = (proc.stderr or proc.stdout)[-2000:]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b")
    p.add_argument("--methods", default="wanda@0.5")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--data-dir", default=os.environ.get("NNXPRUNE_DATA_DIR"))
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine_info

    from nnxprune.io.atomic import write_json

    out = Path(args.out)  # rows of other (shape, method) pairs are kept: runs accumulate
    old = json.loads(out.read_text()).get("rows", []) if out.exists() else []
    machine = machine_info()
    for shape in args.shapes.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"nnxprune-scale-{shape}-"))
        try:  # one checkpoint per shape, pruned by every method
            model, made = make_model(shape, work)
            for method in args.methods.split(","):
                row = run_one(shape, method, args.nsamples, args.seqlen, work, args.data_dir,
                              model, made)
                row["loadavg_end"] = list(os.getloadavg())  # the machine is shared: say how busy
                print(json.dumps(row), flush=True)
                old = [r for r in old if (r["shape"], r["method"]) != (row["shape"], method)]
                old.append(row)
                write_json(out, {"benchmark": "scale", "machine": machine, "rows": old,
                                 "formula": predict.__doc__.split("\n")[0] + " ..."})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
