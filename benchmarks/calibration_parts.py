"""Where a calibration forward's time goes: one SmolLM2 decoder layer over 8 x 1024 tokens.

The sequential driver's two programs per layer (`calibration.sequential`): the statistics forward
(Wanda's `InputSumSq` plan; SparseGPT's `InputXtX`) and the pruned forward, beside their parts
timed alone: the seven projections as plain matmuls, the causal attention, and the rest (norms,
RoPE, SiLU, residuals: the whole minus those two). The floor is each part's matmul FLOPs over this
machine's matmul rate (`common.matmul_rate`, a `[1024, 576] x [576, 1536]` product). Parts are
timed in turn (one repeat of each, then the next round), medians. Each round also times the same
product in torch (`torch.set_num_threads` = the cores XLA uses), the GEMM of the torch baseline
in `sparsity.py`: the two rates say how far apart the two implementations' floors are.

    OPENBLAS_NUM_THREADS=1 python benchmarks/calibration_parts.py --rounds 7

Prints a Markdown table; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (equal_threads, machine_info, matmul_rate, median,  # noqa: E402
                    torch_matmul_rate)


def parts(model, n: int, seqlen: int):
    """`{part: (fn, matmul FLOPs)}` for layer 0 of `model` on random inputs `[n, seqlen, D]`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nnxprune.calibration import sequential as seq
    from nnxprune.calibration.collectors import InputSumSq, InputXtX
    from nnxprune.models.attention import causal_attention

    c = model.config
    layer = model.layers[0]
    s = c.layers[0]
    d, q, kv, f, dh = c.hidden_size, s.num_heads * c.head_dim, s.num_kv_heads * c.head_dim, \
        s.intermediate_size, c.head_dim
    x = jax.random.normal(jax.random.PRNGKey(0), (n, seqlen, d), jnp.float32)
    inv_freq = model.inv_freq
    tokens = n * seqlen
    proj = 2 * tokens * (d * q + 2 * d * kv + q * d + 3 * d * f)
    attn = 2 * 2 * n * seqlen * (seqlen / 2) * q
    graphdef, state = nnx.split(layer)
    names = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    wanda_plan = ((InputSumSq(names=names), names),)
    gpt_plan = ((InputXtX(names=names), names),)
    xtx = 2 * tokens * (d * d + q * q + d * d + f * f)

    def stats(plan):
        seq._set_recording(layer, names, True)
        g, st = nnx.split(layer)
        seq._set_recording(layer, names, False)
        return lambda: jax.block_until_ready(seq._forward_with_stats(g, plan, st, x, False, inv_freq))

    kernels = [jax.random.normal(jax.random.PRNGKey(i), shape, jnp.float32) * 0.02 for i, shape in
               enumerate([(d, q + 2 * kv), (q, d), (d, 2 * f), (f, d)])]

    @jax.jit
    def projections(x, ks):  # fused q/k/v and gate/up, as one program per sequence
        def row(r):
            qkv = r @ ks[0]
            o = qkv[:, :q] @ ks[1]
            gu = o @ ks[2]
            return gu[:, :f] @ ks[3]
        return jax.lax.map(row, x)

    qs = jax.random.normal(jax.random.PRNGKey(5), (n, seqlen, s.num_kv_heads, s.num_heads // s.num_kv_heads, dh), jnp.float32)
    ks_ = jax.random.normal(jax.random.PRNGKey(6), (n, seqlen, s.num_kv_heads, dh), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(seqlen)[None], (n, seqlen))
    attention = jax.jit(lambda a, b, v: jax.lax.map(
        lambda r: causal_attention(r[0][None], r[1][None], r[2][None], pos[:1])[0], (a, b, v)))
    return {
        "pruned_forward": (lambda: jax.block_until_ready(seq._forward(graphdef, state, x, inv_freq)),
                           proj + attn),
        "stats_forward_wanda": (stats(wanda_plan), proj + attn),
        "stats_forward_sparsegpt": (stats(gpt_plan), proj + attn + xtx),
        "projections": (lambda: jax.block_until_ready(projections(x, kernels)), proj),
        "attention": (lambda: jax.block_until_ready(attention(qs, ks_, ks_)), attn),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from nnxprune.io.load import load_model

    equal_threads()  # torch's GEMM at as many threads as XLA's CPU pool

    model = load_model(args.model, with_tokenizer=False).model
    table = parts(model, args.n, args.seqlen)
    for fn, _ in table.values():
        fn()  # compile
    times = {k: [] for k in table}
    rate, torch_rate = [], []
    for _ in range(args.rounds):
        rate.append(matmul_rate(3))
        torch_rate.append(torch_matmul_rate(1024, 576, 1536))
        for k, (fn, _) in table.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    gflops = median(rate)
    rows = []
    for k, (_, flops) in table.items():
        floor = flops / gflops / 1e9
        rows.append({"part": k, "seconds": median(times[k]), "floor_s": floor,
                     "over_floor": median(times[k]) / floor, "all_s": times[k]})
    parts_sum = {r["part"]: r["seconds"] for r in rows}
    rest = parts_sum["pruned_forward"] - parts_sum["projections"] - parts_sum["attention"]
    print("| part | ms | floor ms | / floor |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {1e3 * r['seconds']:.1f} | {1e3 * r['floor_s']:.1f} | "
              f"{r['over_floor']:.2f}x |")
    print(f"| rest of the pruned forward (norms, RoPE, SiLU, residuals) | {1e3 * rest:.1f} | | |")
    torch_gflops = median(torch_rate)
    print(f"\nmatmul rate {gflops:.0f} GFLOP/s (torch: {torch_gflops:.0f}); layer 0, "
          f"{args.n} x {args.seqlen} tokens; "
          f"{machine_info()['cpu']}; load {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "matmul_gflops": gflops,
                                              "matmul_gflops_runs": rate,
                                              "torch_matmul_gflops": torch_gflops,
                                              "torch_matmul_gflops_runs": torch_rate,
                                              "rest_s": rest, "machine": machine_info()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
