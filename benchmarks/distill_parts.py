"""Where a distillation step's time goes: its parts timed alone, nnxprune (JAX) beside torch.

The parts of the step `distill_speed.py` times, each alone, on the same model, batch and threads
(alternating, one repeat of each part in turn; medians):

- `teacher_fwd`: the teacher's forward to logits `[B, T, V]` (nnxprune: jitted `losses.forward`;
  torch: `LlamaForCausalLM` under `torch.no_grad()`);
- `student_fwd`: the student's forward alone (no gradient);
- `student_fwd_bwd_kl`: the student's forward, the forward KL against given teacher logits and
  the backward to every parameter (nnxprune: `jax.value_and_grad` of `losses.forward_kl`, jitted;
  torch: `loss.backward()`);
- `head_kl_fwd_bwd`: the output head and the KL alone, forward and backward, from given final
  hidden states (the `[B, T, V]` part of the step);
- `optimizer`: clipping and one AdamW update from given gradients (nnxprune: `trainer.make_tx`
  through `nnx.Optimizer.update`, jitted, state donated; torch: `clip_grad_norm_` + `AdamW.step`);
- `step`: the whole step (nnxprune: the trainer's session step; torch: `distill_speed.torch_step`).

    OPENBLAS_NUM_THREADS=1 NNXPRUNE_DATA_DIR=../shared/data python benchmarks/distill_parts.py \\
        --batch 4 --seqlen 256 --repeats 3

Prints a Markdown table (seconds per part and the nnxprune/torch ratio); `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median  # noqa: E402
import distill_speed as ds  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def jax_parts(student, teacher, cfg, tokens):
    """`{part: () -> None}` for nnxprune, each blocking until its result is ready."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from nnxprune.recovery.losses import forward, forward_kl
    from nnxprune.recovery.trainer import make_tx

    s_gdef, s_state = nnx.split(student)
    t_gdef, t_state = nnx.split(teacher)
    x = jnp.asarray(tokens)

    @jax.jit
    def logits(gdef_state, tok):
        return forward(nnx.merge(t_gdef, gdef_state), tok).logits

    t_logits = logits(t_state, x)

    def kl_of(params, tok, t_lg):
        return forward_kl(forward(nnx.merge(s_gdef, params), tok).logits, t_lg, 1.0)

    fwd_bwd = jax.jit(jax.value_and_grad(kl_of))
    model = nnx.merge(s_gdef, s_state)
    h = model.norm(model.run_layers(model.embed_tokens(x), jnp.broadcast_to(
        jnp.arange(x.shape[1]), x.shape)).x)
    emb = model.embed_tokens.embedding[...]
    head = jax.jit(jax.value_and_grad(
        lambda e, h, t_lg: forward_kl(jnp.dot(h, e.T), t_lg, 1.0), argnums=(0, 1)))
    _, grads = fwd_bwd(s_state, x, t_logits)
    tx = make_tx(cfg)
    opt_state = [tx.init(s_state)]
    params = [jax.tree.map(jnp.copy, s_state)]

    def update(p, o, g):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o
    update = jax.jit(update, donate_argnums=(0, 1))

    def opt():
        params[0], opt_state[0] = update(params[0], opt_state[0], grads)
        jax.block_until_ready(params[0])

    return {
        "teacher_fwd": lambda: logits(t_state, x).block_until_ready(),
        "student_fwd": lambda: logits(s_state, x).block_until_ready(),
        "student_fwd_bwd_kl": lambda: jax.block_until_ready(fwd_bwd(s_state, x, t_logits)),
        "head_kl_fwd_bwd": lambda: jax.block_until_ready(head(emb, h, t_logits)),
        "optimizer": opt,
    }


def torch_parts(student_model, teacher_model, cfg, tokens, torch):
    """The same parts in torch (teacher and student from nnxprune's HF export)."""
    import tempfile

    import transformers

    from nnxprune.io.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        load = transformers.LlamaForCausalLM.from_pretrained
        student = load(str(export_hf(student_model, Path(tmp) / "s")), dtype=torch.float32)
        teacher = load(str(export_hf(teacher_model, Path(tmp) / "t")), dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0)
    f = torch.nn.functional
    x = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        t_logits = teacher(x).logits
        h = student.model(x).last_hidden_state.detach()
    v = t_logits.shape[-1]
    t_log = f.log_softmax(t_logits.reshape(-1, v), -1)

    def kl(s_logits):
        return f.kl_div(f.log_softmax(s_logits.reshape(-1, v), -1), t_log, reduction="batchmean",
                        log_target=True)

    def fwd_bwd():
        student.zero_grad(set_to_none=True)
        kl(student(x).logits).backward()

    def head():
        e = student.lm_head.weight.detach().requires_grad_(True)
        hh = h.clone().requires_grad_(True)
        kl(hh @ e.T).backward()

    def optimizer():
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_norm)
        opt.step()

    def no_grad(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    fwd_bwd()  # gradients for the optimizer part
    return {"teacher_fwd": no_grad(teacher), "student_fwd": no_grad(student),
            "student_fwd_bwd_kl": fwd_bwd, "head_kl_fwd_bwd": head, "optimizer": optimizer}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.steps, args.warmup = args.repeats + 1, 1
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dense, batches, _ = ds.setup(args)
    student = ds.perturbed_copy(dense)
    cfg = ds.recovery_config(args, len(batches))
    tokens = batches[0]
    sides = {"nnxprune": jax_parts(student, dense, cfg, tokens),
             "torch": torch_parts(student, dense, cfg, tokens, torch)}
    sides["nnxprune"]["step"] = lambda s=ds.nnxprune_step(student, dense, cfg): s(0, tokens)
    sides["torch"]["step"] = lambda s=ds.torch_step(student, dense, cfg, torch)[0]: s(0, tokens)
    times = {side: {part: [] for part in parts} for side, parts in sides.items()}
    for r in range(args.repeats + 1):  # the first round warms up (compiles), not kept
        for part in sides["nnxprune"]:
            for side, parts in sides.items():
                sec = _timed(parts[part])
                if r:
                    times[side][part].append(sec)
        print(f"round {r + 1}/{args.repeats + 1} done, load {os.getloadavg()[0]:.2f}", flush=True)
    med = {side: {p: median(v) for p, v in t.items()} for side, t in times.items()}
    lines = [f"batch {args.batch} x seqlen {args.seqlen}, {torch.get_num_threads()} threads, "
             f"median of {args.repeats}", "", "| part | nnxprune s | torch s | nnxprune / torch |",
             "|---|---:|---:|---:|"]
    for part in med["nnxprune"]:
        a, b = med["nnxprune"][part], med["torch"][part]
        lines.append(f"| {part} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    print("\n".join(lines))
    if args.out:
        from nnxprune.io import atomic

        atomic.write_json(args.out, {"batch": args.batch, "seqlen": args.seqlen, "median": med,
                                     "runs": times, "loadavg_end": list(os.getloadavg())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
