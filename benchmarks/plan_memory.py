"""Measured vs predicted peak memory (`nnxprune.plan`, issue 28 item 6).

Writes random-weight bf16 checkpoints of small Llama shapes (`scale.write_checkpoint`, SmolLM2's
tokenizer added), runs `nnxprune prune --stream`, the in-memory `nnxprune prune` and `nnxprune eval`
on them (and on the installed SmolLM2-135M) in child processes, and records each child's own peak
resident memory (`os.wait4`'s `ru_maxrss`) beside the prediction `nnxprune.plan` makes from the
config alone. The measurements are kept; `--predict-only` recomputes the predicted column (after a
change of the formula) without rerunning anything.

    python benchmarks/plan_memory.py                       # every case (about 20 min on 2 cores)
    python benchmarks/plan_memory.py --cases s1024-stream-wanda,s2048-eval
    python benchmarks/plan_memory.py --predict-only

Writes benchmarks/results/plan_memory.json: `rows` (case, shape, params, mode, method, dtype,
calibration, measured_rss_gb, predicted_rss_gb, ratio, seconds, returncode).
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "plan_memory.json"

# small Llama-3-like shapes (vocab >= SmolLM2's 49152 token ids)
SHAPES = {
    "s256": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=49152),
    "s1024": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=49152),
    "s2048": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=3,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256),
}

# case: (shape, mode, method, nsamples, seqlen, dtype)
CASES = {
    "s256-stream-wanda": ("s256", "stream", "wanda@0.5", 8, 256, "float32"),
    "s1024-stream-wanda": ("s1024", "stream", "wanda@0.5", 8, 256, "float32"),
    "s1024-stream-sparsegpt": ("s1024", "stream", "sparsegpt@2:4", 8, 256, "float32"),
    "s2048-stream-wanda": ("s2048", "stream", "wanda@0.5", 8, 256, "float32"),
    "s2048-stream-sparsegpt": ("s2048", "stream", "sparsegpt@2:4", 8, 256, "float32"),
    "s2048-stream-magnitude": ("s2048", "stream", "magnitude@0.5", 0, 0, "float32"),
    "s2048-stream-wanda-32x512": ("s2048", "stream", "wanda@0.5", 32, 512, "float32"),
    "s2048-stream-wanda-bf16": ("s2048", "stream", "wanda@0.5", 8, 256, "bfloat16"),
    "smollm2-stream-wanda": ("smollm2", "stream", "wanda@0.5", 16, 512, "float32"),
    "smollm2-stream-sparsegpt": ("smollm2", "stream", "sparsegpt@0.5", 16, 512, "float32"),
    "s1024-memory-wanda": ("s1024", "memory", "wanda@0.5", 8, 256, "float32"),
    "s2048-memory-wanda": ("s2048", "memory", "wanda@0.5", 8, 256, "float32"),
    "s2048-memory-wanda-bf16": ("s2048", "memory", "wanda@0.5", 8, 256, "bfloat16"),
    "s2048-eval": ("s2048", "eval", None, 4, 512, "float32"),
    "smollm2-eval": ("smollm2", "eval", None, 8, 1024, "float32"),
}


def hf_config(shape: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "hidden_act": "silu",
            "tie_word_embeddings": True, **SHAPES[shape]}


# The command runs under a small launcher that forks (not vfork) and execs it: Linux carries a
# process's high-water RSS across exec (`ru_maxrss` covers the image it replaced), and Python's
# subprocess starts children with vfork, so a child started from this process would report this
# process's own peak (the checkpoint writer's) whenever that is larger than the child's.
LAUNCH = ("import os, sys\n"
          "pid = os.fork()\n"
          "if pid == 0:\n"
          "    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
          "_, status, usage = os.wait4(pid, 0)\n"
          "open(sys.argv[1], 'w').write(str(usage.ru_maxrss * 1024))\n"
          "sys.exit(os.waitstatus_to_exitcode(status))\n")


def peak_of(cmd: list[str]) -> tuple[int, float, int, str]:
    """(returncode, seconds, the command's own peak RSS in bytes, its output tail)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        proc = subprocess.run([sys.executable, "-c", LAUNCH, str(peak_file), *cmd[1:]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        peak = int(peak_file.read_text()) if peak_file.exists() else 0
    return proc.returncode, time.perf_counter() - t0, peak, \
        proc.stdout.decode(errors="replace")[-1500:]


def recipe_text(method: str | None, nsamples: int, seqlen: int) -> str:
    kind, amount = method.split("@")
    setting = f'pattern = "{amount}"' if ":" in amount else f"sparsity = {float(amount)}"
    text = f'[recipe]\nname = "plan"\n\n[[prune]]\nkind = "{kind}"\n{setting}\n'
    if nsamples:
        text += (f'\n[calibration]\ndataset = "c4"\nnsamples = {nsamples}\nseqlen = {seqlen}\n'
                 f'seed = 0\n')
    return text


def command(case: tuple, model: str, work: Path, data_dir: str) -> list[str]:
    shape, mode, method, nsamples, seqlen, dtype = case
    base = [sys.executable, "-m", "nnxprune.cli"]
    if mode == "eval":
        return base + ["eval", model, "--dtype", dtype, "--seqlen", str(seqlen), "--max-windows",
                       str(nsamples), "--no-progress", "--data-dir", data_dir]
    recipe = work / "recipe.toml"
    recipe.write_text(recipe_text(method, nsamples, seqlen))
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = base + ["prune", str(recipe), "--model", model, "--out", str(out), "--no-progress",
                  "--dtype", dtype, "--data-dir", data_dir, "--overwrite"]
    return cmd + (["--stream"] if mode == "stream" else ["--no-views"])


def predicted(case: tuple, model: str) -> dict:
    from nnxprune import plan
    from nnxprune.io.load import peek_config

    shape, mode, method, nsamples, seqlen, dtype = case
    config = peek_config(model)
    input_dtype = "float32" if shape == "smollm2" else "bfloat16"  # SmolLM2 is a GGUF: float32
    kind = method.split("@")[0] if method else None
    if mode == "eval":
        p = plan.eval_memory(config, dtype=dtype, seqlen=seqlen, batch_size=1)
    elif mode == "stream":
        p = plan.streamed_memory(config, kind, nsamples=nsamples, seqlen=seqlen, dtype=dtype,
                                 input_dtype=input_dtype)
    else:
        p = plan.in_memory_prune(config, kind, nsamples=nsamples, seqlen=seqlen, dtype=dtype)
    return {"predicted_rss_gb": p.host_bytes / 1e9, "predicted_parts_gb": p.parts_gb()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--data-dir", default=os.environ.get("NNXPRUNE_DATA_DIR"))
    p.add_argument("--predict-only", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale import add_tokenizer, write_checkpoint

    from nnxprune.io.atomic import write_json

    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    work = Path(tempfile.mkdtemp(prefix="nnxprune-plan-"))
    models: dict[str, str] = {"smollm2": "smollm2-135m"}
    try:
        for name in args.cases.split(","):
            case = CASES[name]
            shape = case[0]
            if shape not in models and args.predict_only:
                models[shape] = str(work / shape)
                (work / shape).mkdir()
                (work / shape / "config.json").write_text(json.dumps(hf_config(shape)))
            elif shape not in models:
                folder = work / shape
                folder.mkdir()
                write_checkpoint(folder, hf_config(shape))
                add_tokenizer(folder)
                models[shape] = str(folder)
            row = next((r for r in rows if r["case"] == name), None)
            if not args.predict_only:
                rc, seconds, peak, tail = peak_of(command(case, models[shape], work, args.data_dir))
                row = {"case": name, "shape": shape, "mode": case[1], "method": case[2],
                       "dtype": case[5], "calibration": f"{case[3]} x {case[4]}",
                       "measured_rss_gb": peak / 1e9, "seconds": seconds, "returncode": rc,
                       "loadavg": list(os.getloadavg())}
                if rc:
                    row["error"] = tail
                rows = [r for r in rows if r["case"] != name] + [row]
            if row is None:
                continue
            row.update(predicted(case, models[shape]))
            row["ratio"] = row["measured_rss_gb"] / row["predicted_rss_gb"]
            print(json.dumps({k: v for k, v in row.items() if k != "predicted_parts_gb"}),
                  flush=True)
            write_json(out, {"benchmark": "plan_memory", "shapes": SHAPES, "rows": rows})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
