"""Memory plans without the hardware: per-device bytes of sharded training and of the Taylor pass
for Llama-3.1-8B and 70B on 8 and 64 devices, from XLA's memory analysis (issue 29, item 5).

For each (model, mesh, step) the step is traced on an abstract model (no weights), lowered with
the trainer's shardings and compiled for forced host CPU devices in a child process
(`nnxprune.plan_distributed.plan_in_child`); `compiled.memory_analysis()` gives the bytes. The
models are compiled with 1 and 2 decoder layers and extrapolated linearly to their depth; one row
per model is also compiled with 4 layers to check the extrapolation (`extrapolation_check`).

    python benchmarks/distributed_plan.py                      # every row (about 30 min here)
    python benchmarks/distributed_plan.py --models 8b --steps taylor

Writes benchmarks/results/distributed.json: `rows` (model, mesh, devices, step, settings,
bytes_per_device, breakdown, fits_h100_80gb, fits_tpu_v5e_16gb, method, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"
H100, V5E = 80e9, 16e9

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "factor": 8.0}
# the public configs (meta-llama/Llama-3.1-8B and Llama-3.1-70B config.json)
MODELS = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8),
}
MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
          "fsdp8xtensor8": {"data": 1, "fsdp": 8, "tensor": 8},
          "fsdp64": {"data": 1, "fsdp": 64, "tensor": 1}}
SEQLEN = 2048


def hf_config(name: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "rope_scaling": LLAMA3_ROPE,
            "torch_dtype": "bfloat16", **MODELS[name]}


def recovery(step: str, batch: int) -> dict:
    """The recovery table of a step: one 2048-token sequence per batch-axis device, bf16 compute
    with float32 master weights and AdamW; LoRA rank 16 on every projection."""
    rec = {"kind": step, "batch_size": batch, "seqlen": SEQLEN, "compute_dtype": "bfloat16"}
    if step == "lora":
        rec["lora"] = {"rank": 16}
    if step == "distill":
        rec["distill"] = {}
    return rec


def spec_for(model: str, mesh: str, step: str, layers) -> dict:
    from nnxprune.io.hf_config import config_from_hf

    sizes = MESHES[mesh]
    batch = sizes["data"] * sizes["fsdp"]
    spec = {"config": config_from_hf(hf_config(model)).to_dict(), "mesh": sizes, "step": step,
            "layers": list(layers)}
    if step == "taylor":
        spec.update(nsamples=batch, seqlen=128)  # LLM-Pruner's calibration: short rows
    else:
        spec.update(recovery=recovery(step, batch), masks=True)
    return spec


def settings_of(spec: dict) -> str:
    if spec["step"] == "taylor":
        return (f"first-order Taylor pass, float32, {spec['nsamples']} x {spec['seqlen']} tokens "
                f"at once")
    r = spec["recovery"]
    extra = ", LoRA rank 16 on every projection" if r["kind"] == "lora" else (
        ", frozen teacher of the same shape" if r["kind"] == "distill" else "")
    return (f"{r['kind']}: batch {r['batch_size']} x {r['seqlen']} tokens, bf16 compute, float32 "
            f"master weights, AdamW, bool masks on every projection{extra}")


def measure(model: str, mesh: str, step: str, check_layers: int) -> dict:
    """One row: the step compiled with 1 and 2 layers and extrapolated; with `check_layers`,
    also compiled with that many layers to check the extrapolation."""
    from nnxprune.plan_distributed import plan_in_child

    spec = spec_for(model, mesh, step, (1, 2))
    t0 = time.perf_counter()
    got = plan_in_child(spec, timeout=3600)
    b = got["bytes"]
    row = {"model": model, "mesh": MESHES[mesh], "mesh_name": mesh,
           "devices": math.prod(MESHES[mesh].values()), "step": step,
           "settings": settings_of(spec), "bytes_per_device": b["peak"],
           "gb_per_device": b["peak"] / 1e9, "breakdown": b,
           "fits_h100_80gb": b["peak"] <= H100, "fits_tpu_v5e_16gb": b["peak"] <= V5E,
           "method": got["method"], "measured_layers": got["measured_layers"]}
    if check_layers:  # the linear extrapolation against a deeper compile
        n = check_layers
        deeper = plan_in_child({**spec, "layers": [], "config": {
            **spec["config"], "layers": spec["config"]["layers"][:n]}}, timeout=3600)["bytes"]
        one, two = (got["measured_layers"][k] for k in ("1", "2"))
        line = {k: one[k] + (two[k] - one[k]) * (n - 1) for k in one}
        row["extrapolation_check"] = {"layers": n, "compiled_peak": deeper["peak"],
                                      "extrapolated_peak": line["peak"],
                                      "relative_error": line["peak"] / deeper["peak"] - 1}
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="8b,70b")
    p.add_argument("--meshes", default="fsdp8,fsdp8xtensor8")
    p.add_argument("--steps", default="pretrain,lora,distill,taylor")
    p.add_argument("--rows", default=None,
                   help="MODEL:MESH:STEP,... in this order instead of every combination, "
                        "e.g. 70b:fsdp8xtensor8:pretrain")
    p.add_argument("--check-layers", type=int, default=4,
                   help="compile the first row of each model with this many layers too (0: skip)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine_info

    from nnxprune.io.atomic import write_json

    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    doc = {"benchmark": "distributed_plan", "machine": machine_info(),
           "method": "each step traced on an abstract model (jax.ShapeDtypeStruct, no weights), "
                     "lowered with the trainer's shardings and compiled for forced host CPU "
                     "devices (--xla_force_host_platform_device_count); bytes from "
                     "compiled.memory_analysis(): peak = argument + output - alias + temp. "
                     "Compiled with 1 and 2 decoder layers, every count extrapolated linearly "
                     "to the model's depth (checked against a 4-layer compile per model).",
           "budgets_gb": {"h100": H100 / 1e9, "tpu_v5e": V5E / 1e9}}
    todo = [r.split(":") for r in args.rows.split(",")] if args.rows else [
        (m, mesh, step) for m in args.models.split(",") for mesh in args.meshes.split(",")
        for step in args.steps.split(",")]
    checked = {r["model"] for r in rows if "extrapolation_check" in r}
    for short, mesh, step in todo:
        model = f"llama-3.1-{short}"
        row = measure(model, mesh, step, args.check_layers if model not in checked else 0)
        checked |= {model} if "extrapolation_check" in row else set()
        print(json.dumps({k: row[k] for k in ("model", "mesh_name", "step", "gb_per_device",
                                              "seconds")}), flush=True)
        rows = [r for r in rows if (r["model"], r.get("mesh_name"), r["step"])
                != (model, mesh, step)] + [row]
        write_json(out, {**doc, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
