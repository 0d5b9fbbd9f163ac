"""Distillation speed: nnxprune's training step against the same step in torch + transformers,
and both against this machine's fp32 matmul floor.

One distillation step is: the student's forward and backward, the frozen teacher's forward, the
forward KL(teacher || student) at T=1 over the full vocabulary (mean over tokens), global-norm
clipping at 1 and one AdamW update (the `[recovery]` settings of
`recipes/wanda-2of4-distill.toml`: betas 0.9/0.95, eps 1e-8, no weight decay, warmup + cosine).
The teacher is the dense model; the student a copy of it with every parameter scaled by
`1 + 0.05 * N(0, 1)` (seed 0), so that the KL and its gradients are not zero. In one process, on
the same C4 windows, at equal threads, batch and sequence length:

1. nnxprune: exactly the jitted step `nnxprune train` runs (`recovery.trainer`: the session
   `train` builds, its `step`, the loss of `recovery.losses`), float32;
2. torch: `LlamaForCausalLM` (transformers, fp32, its default attention) built from the same
   weights through nnxprune's HF export, `torch.optim.AdamW`, `clip_grad_norm_`, the teacher under
   `torch.no_grad()`, `torch.set_num_threads` = the CPUs JAX uses;
3. the floor: the step's matmul FLOPs (student forward + backward = 3x the forward's, teacher
   1x; projections, the tied output head over the whole vocabulary and the causal attention score
   and value matmuls; see `eval_speed.FLOPS_FORMULA`) at the best median rate of large jitted
   fp32 `jnp.dot`s measured in the same run.

The two steps alternate (one nnxprune step, one torch step, one matmul-rate probe) so that load
from other processes falls on both alike; each side's first `--warmup` steps (compilation, first
executions, allocator warm-up) are not timed; the numbers are medians over the timed steps. Both
start from the same weights and see the same batches, so their losses agree step by step (the
first step's exactly up to float rounding; the JSON keeps every step's pair).

    OPENBLAS_NUM_THREADS=1 NNXPRUNE_DATA_DIR=../shared/data python benchmarks/distill_speed.py
    python benchmarks/distill_speed.py --steps 2 --batch 1 --seqlen 64   # a smoke run
    python benchmarks/distill_speed.py --quick --out /tmp/d.json         # tiny random model

`--quick` needs neither the model nor data: a tiny random Llama (2 layers, vocabulary 512) and
random tokens, batch 2, seqlen 32, 3 steps (a test runs it). Writes
`benchmarks/results/distill_speed.json` and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, median, time_matmul, write_results  # noqa: E402
from eval_speed import FLOPS_FORMULA, matmul_flops_per_window  # noqa: E402

RECOVERY = {"kind": "distill", "lr": 3e-4, "warmup_steps": 3, "min_lr_ratio": 0.1,
            "weight_decay": 0.0, "clip_norm": 1.0, "eval_every": 0, "eval_batches": 0,
            "distill": {"temperature": 1.0, "kd_weight": 1.0}}


def cpu_model() -> str:
    """The CPU's model name as `lscpu` prints it (else /proc/cpuinfo's)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return machine_info()["cpu"]


def setup(args):
    """The dense model (the teacher; the student is a perturbed copy), `[N, B, T]` int32 batches
    and a description of both."""
    if args.quick:
        import jax.numpy as jnp
        from flax import nnx

        from nnxprune.models.llama import Llama, LlamaConfig

        cfg = LlamaConfig.uniform(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                                  num_kv_heads=2, intermediate_size=128, head_dim=16)
        model = Llama(cfg, rngs=nnx.Rngs(0))
        rng = np.random.default_rng(0)
        for path, var in nnx.iter_graph(model):  # larger weights than the init: O(1) logits
            if isinstance(var, nnx.Param) and path[-1] != "scale":
                var[...] = jnp.asarray(0.2 * rng.standard_normal(var.shape), jnp.float32)
        batches = rng.integers(0, 512, size=(args.warmup + args.steps, args.batch, args.seqlen))
        return model, batches.astype(np.int32), "tiny random Llama (2 layers, V=512), random tokens"
    from nnxprune.data import load_windows, resolve_data_dir
    from nnxprune.io.load import load_model

    loaded = load_model(args.model)
    n = args.warmup + args.steps
    windows = load_windows(loaded.tokenizer, "c4", seqlen=args.seqlen, train_windows=n * args.batch,
                           heldout_windows=0, data_dir=resolve_data_dir(None))
    return (loaded.model, windows.train.reshape(n, args.batch, args.seqlen).astype(np.int32),
            f"{args.model}; C4 windows ({windows.source})")


def perturbed_copy(model, rel: float = 0.05, seed: int = 0):
    """The student: a copy of `model` with every parameter times `1 + rel * N(0, 1)` (fixed
    seed), so that the KL to the teacher and its gradients are not zero."""
    import jax.numpy as jnp
    from flax import nnx

    student = nnx.clone(model)
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(student):
        if isinstance(var, nnx.Param):
            noise = 1.0 + rel * rng.standard_normal(var.shape, dtype=np.float32)
            var[...] = var[...] * jnp.asarray(noise, var.dtype)
    return student


def recovery_config(args, total_steps: int):
    from nnxprune.recovery import RecoveryConfig

    return RecoveryConfig.from_dict({**RECOVERY, "steps": total_steps, "batch_size": args.batch,
                                     "seqlen": args.seqlen})


def nnxprune_step(student, teacher, cfg):
    """`step(i, tokens [B, T]) -> (seconds, loss)`: the session `recovery.train` builds and its
    jitted step, as `train`'s loop calls it (the batch placed before the clock starts). The
    session trains its own copy of `student`'s parameters."""
    import jax.numpy as jnp
    from flax import nnx

    from nnxprune.recovery import sharding as sh
    from nnxprune.recovery import trainer
    from nnxprune.recovery.losses import strategy_for

    strategy = strategy_for(cfg)
    mesh = sh.make_mesh(cfg.check(student.config))
    session = trainer._session(student, teacher, strategy, cfg, nnx.Param, mesh)

    def step(i: int, tokens: np.ndarray) -> tuple[float, float]:
        batch = trainer._place(jnp.asarray(tokens[None]), session.batch_sh)  # [grad_accum=1, B, T]
        t0 = time.perf_counter()
        stats = session.step(batch, i)  # floats: waits for the step
        return time.perf_counter() - t0, stats["loss"]
    return step


def torch_step(student_model, teacher_model, cfg, torch):
    """The same step in torch: `LlamaForCausalLM`s from nnxprune's HF export of both models."""
    import optax
    import transformers

    from nnxprune.io.hf import export_hf
    from nnxprune.recovery.trainer import schedule

    with tempfile.TemporaryDirectory() as tmp:
        load = transformers.LlamaForCausalLM.from_pretrained
        student = load(str(export_hf(student_model, Path(tmp) / "s")), dtype=torch.float32)
        teacher = load(str(export_hf(teacher_model, Path(tmp) / "t")), dtype=torch.float32)
    student.train()
    teacher.eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=cfg.weight_decay)
    sched: optax.Schedule = schedule(cfg)  # the trainer's schedule, step by step
    f = torch.nn.functional

    def step(i: int, tokens: np.ndarray) -> tuple[float, float]:
        x = torch.from_numpy(tokens.astype(np.int64))
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(x).logits
        s_logits = student(x).logits
        v = s_logits.shape[-1]
        loss = f.kl_div(f.log_softmax(s_logits.float().reshape(-1, v), -1),
                        f.log_softmax(t_logits.float().reshape(-1, v), -1),
                        reduction="batchmean", log_target=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_norm)
        for group in opt.param_groups:
            group["lr"] = float(sched(i))
        opt.step()
        value = float(loss.detach())
        return time.perf_counter() - t0, value
    info = {"transformers": transformers.__version__, "torch": torch.__version__,
            "attn_implementation": student.config._attn_implementation}
    return step, info


def step_flops(model, batch: int, seqlen: int) -> dict:
    """Matmul FLOPs of one distillation step: student 3x the forward, teacher 1x."""
    fwd = matmul_flops_per_window(model, seqlen)
    forward = fwd["total"] * batch
    return {"forward": forward, "student_fwd_bwd": 3 * forward, "teacher_fwd": forward,
            "step": 4 * forward, "per_window": fwd}


def torch_matmul_rate(torch, n: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    with torch.inference_mode():
        a @ b
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / median(times) / 1e9


def run(args, torch) -> dict:
    """Builds both steps and alternates them; returns the per-step times, losses and rates."""
    dense, batches, source = setup(args)
    n = len(batches)
    cfg = recovery_config(args, n)
    student = perturbed_copy(dense)
    ours = nnxprune_step(student, dense, cfg)
    theirs, theirs_info = torch_step(student, dense, cfg, torch)
    del student  # both sides hold their own copies
    gc.collect()
    bt = args.batch * args.seqlen
    d, v = dense.embed_tokens.embedding.shape[1], dense.embed_tokens.embedding.shape[0]
    shapes = {"2048x2048x2048": (2048, 2048, 2048), f"{bt}x{d}x{v} (output head)": (bt, d, v)}
    if args.quick:
        shapes = {"512x512x512": (512, 512, 512)}
    rec = {"nnxprune": [], "torch": [], "nnxprune_loss": [], "torch_loss": [],
           "rates": {k: [] for k in shapes}, "torch_rate": []}
    for i in range(n):
        sec, loss = ours(i, batches[i])
        rec["nnxprune"].append(sec)
        rec["nnxprune_loss"].append(loss)
        sec, loss = theirs(i, batches[i])
        rec["torch"].append(sec)
        rec["torch_loss"].append(loss)
        for name, shape in shapes.items():
            rec["rates"][name].append(time_matmul(*shape, repeats=5))
        rec["torch_rate"].append(torch_matmul_rate(torch, 512 if args.quick else 2048))
        print(f"step {i + 1}/{n}{' (warm-up)' if i < args.warmup else ''}: nnxprune "
              f"{rec['nnxprune'][-1]:.2f}s loss {rec['nnxprune_loss'][-1]:.6f} | torch "
              f"{rec['torch'][-1]:.2f}s loss {rec['torch_loss'][-1]:.6f} | matmul "
              + ", ".join(f"{r[-1]:.0f}" for r in rec["rates"].values()) + " GFLOP/s "
              f"(torch {rec['torch_rate'][-1]:.0f}) | load {os.getloadavg()[0]:.2f}", flush=True)
    rec.update(flops=step_flops(dense, args.batch, args.seqlen), source=source, info=theirs_info)
    return rec


def summarize(args, rec, threads) -> dict:
    w = args.warmup
    ours, theirs = median(rec["nnxprune"][w:]), median(rec["torch"][w:])
    rates = {k: median(v) for k, v in rec["rates"].items()}
    rate = max(rates.values())
    flops = rec["flops"]["step"]
    floor = flops / (rate * 1e9)
    tokens = args.batch * args.seqlen
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(rec["nnxprune_loss"], rec["torch_loss"])]
    return {
        "benchmark": "distill_speed", "model": "tiny-random" if args.quick else args.model,
        "data": rec["source"], "batch": args.batch, "seqlen": args.seqlen,
        "tokens_per_step": tokens, "warmup_steps": w, "timed_steps": args.steps,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "machine": threads.pop("machine") | {"loadavg_end": list(os.getloadavg())},
        "threads": threads, "versions": rec["info"], "recovery": RECOVERY,
        "nnxprune": {"median_step_seconds": ours, "tokens_per_second": tokens / ours,
                     "floor_ratio": ours / floor, "step_seconds": rec["nnxprune"],
                     "first_step_seconds": rec["nnxprune"][0], "losses": rec["nnxprune_loss"]},
        "torch": {"median_step_seconds": theirs, "tokens_per_second": tokens / theirs,
                  "floor_ratio": theirs / floor, "step_seconds": rec["torch"],
                  "first_step_seconds": rec["torch"][0], "losses": rec["torch_loss"]},
        "ratio_nnxprune_over_torch_seconds": ours / theirs,
        "speedup_nnxprune_vs_torch": theirs / ours,
        "first_loss": {"nnxprune": rec["nnxprune_loss"][0], "torch": rec["torch_loss"][0],
                       "rel_diff": diffs[0]},
        "loss_max_rel_diff": max(diffs),
        "flops": rec["flops"], "flops_formula": FLOPS_FORMULA + " Step = 4x the forward "
        "(student forward + backward 3x, teacher forward 1x); the KL, softmaxes, norms and the "
        "optimizer are not counted.",
        "matmul_gflops": rate, "matmul_gflops_by_shape": rates, "matmul_gflops_runs": rec["rates"],
        "torch_matmul_gflops_2048": median(rec["torch_rate"]), "floor_seconds": floor,
    }


def markdown(r: dict) -> str:
    o, t = r["nnxprune"], r["torch"]
    lines = [
        f"Distillation step on {r['model']} ({r['data']}), batch {r['batch']} x seqlen "
        f"{r['seqlen']} = {r['tokens_per_step']} tokens, float32, {r['threads']['jax_cpus']} "
        f"threads each; CPU: {r['cpu']} ({r['machine']['affinity']} cores). Median of "
        f"{r['timed_steps']} steps after {r['warmup_steps']} warm-up steps, the two steps "
        "alternating in one process.", "",
        "| implementation | median s/step | tokens/s | x matmul floor |",
        "|---|---:|---:|---:|",
        f"| nnxprune (`recovery.trainer` step, jit) | {o['median_step_seconds']:.3f} | "
        f"{o['tokens_per_second']:.1f} | {o['floor_ratio']:.2f} |",
        f"| torch {r['versions']['torch']} + transformers {r['versions']['transformers']} "
        f"({r['versions']['attn_implementation']}) | {t['median_step_seconds']:.3f} | "
        f"{t['tokens_per_second']:.1f} | {t['floor_ratio']:.2f} |",
        f"| matmul floor ({r['matmul_gflops']:.0f} GFLOP/s) | {r['floor_seconds']:.3f} | "
        f"{r['tokens_per_step'] / r['floor_seconds']:.1f} | 1.00 |", "",
        f"nnxprune / torch step time: {r['ratio_nnxprune_over_torch_seconds']:.3f} "
        f"(nnxprune {r['speedup_nnxprune_vs_torch']:.2f}x torch's speed). Step matmul work "
        f"{r['flops']['step'] / 1e9:.1f} GFLOP (forward {r['flops']['forward'] / 1e9:.1f}); "
        "JAX matmul medians " + ", ".join(f"{k} {v:.0f}" for k, v in
                                          r["matmul_gflops_by_shape"].items())
        + f" GFLOP/s; torch 2048^3 {r['torch_matmul_gflops_2048']:.0f} GFLOP/s.",
        f"First-step loss (KL): nnxprune {r['first_loss']['nnxprune']:.6f}, torch "
        f"{r['first_loss']['torch']:.6f} (rel. diff {r['first_loss']['rel_diff']:.1e}); largest "
        f"rel. diff over all {len(o['losses'])} steps {r['loss_max_rel_diff']:.1e}. First step "
        f"(compile for nnxprune) {o['first_step_seconds']:.1f} s vs {t['first_step_seconds']:.1f} s. "
        f"Load average {r['machine']['loadavg_start'][0]:.2f} -> {r['machine']['loadavg_end'][0]:.2f}.",
    ]
    return "\n".join(lines) + "\n"


NOTES = "<!-- notes: kept when the benchmark rewrites this file -->"


def kept_notes(md: Path) -> str:
    """The hand-written findings below the `NOTES` marker of an existing Markdown file."""
    if md.is_file() and NOTES in (text := md.read_text()):
        return "\n" + NOTES + text.split(NOTES, 1)[1]
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each implementation")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps of each")
    ap.add_argument("--quick", action="store_true", help="tiny random model, no data (a test)")
    ap.add_argument("--out", default=str(RESULTS / "distill_speed.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seqlen, args.steps, args.warmup = 2, 32, 2, 1
    from nnxprune.errors import UserError
    if min(args.batch, args.seqlen, args.steps, args.warmup) < 1:
        raise UserError("--batch, --seqlen, --steps and --warmup must be >= 1")
    from nnxprune.io.atomic import check_writable
    check_writable(args.out)

    import jax
    import torch

    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(cpus)  # XLA's CPU client runs one thread per available core
    threads = {"machine": machine_info(), "jax_cpus": cpus, "torch_num_threads": torch.get_num_threads(),
               "torch_num_interop_threads": torch.get_num_interop_threads(),
               "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
               "XLA_FLAGS": os.environ.get("XLA_FLAGS"), "jax_devices": [str(d) for d in jax.devices()]}
    t0 = time.perf_counter()
    rec = run(args, torch)
    report = summarize(args, rec, threads)
    report["wall_seconds"] = time.perf_counter() - t0
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write_results(args.out, report, markdown(report) + kept_notes(Path(args.out).with_suffix(".md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
