"""Perplexity-scoring speed: nnxprune vs transformers vs this machine's fp32 matmul floor.

In one process, on the same WikiText-2 windows and the same thread settings:
1. nnxprune: the jitted scorer `evaluate_perplexity` uses (`compile_scorer`, compiled ahead of
   time once with XLA's default CPU pipeline; compilation timed separately), the same batch loop
   as `score_windows`;
2. transformers `LlamaForCausalLM` in fp32 on the same weights (our `export_hf` of the model, which
   is tensor-for-tensor what transformers reads from the GGUF), under `torch.inference_mode()`, same
   batches, same NLL (float32 log-softmax of the logits for tokens 1..T-1); each side gets one
   untimed warm-up batch; torch gets as many intra-op threads as XLA's CPU pool has cores
   (`common.equal_threads`);
3. the matmul floor: jitted fp32 matmuls in JAX (median GFLOP/s of the best shape), the model's matmul FLOPs per window counted from its kernel shapes,
   and `floor_ratio = seconds / (flops / best matmul rate)`.
4. torch's own fp32 matmul on the same shapes (transformers' floor, when it is faster than JAX's).
The four are interleaved (one repeat of each in turn) so that load from other processes on a
shared machine falls on all alike; each number is the median over `--repeats`. Prints a Markdown table; writes JSON atomically.

    python benchmarks/eval_speed.py --model smollm2-135m --seqlen 1024 --windows 8 \\
        --batch-size 1 --repeats 3 --out benchmarks/results/eval_speed.json
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

FLOPS_FORMULA = (
    "per window of T tokens: 2*T*(sum over layers of the q,k,v,o,gate,up,down kernel sizes "
    "[in*out] + the lm_head/tied-embedding size D*V) + sum over layers of 2*T*T*H*Dh "
    "(attention QK^T and PV, each 2*T*T/2*H*Dh multiply-adds counted as 2 flops, causal half). "
    "Norms, RoPE, softmax, SiLU and the loss are not counted. The lm_head is counted for all T "
    "tokens (both implementations compute it for T or T rounded up to a 256 chunk).")


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import equal_threads, machine_info, median, time_matmul, torch_matmul_rate  # noqa: E402


def matmul_flops_per_window(model, seqlen: int) -> dict:
    """Matmul FLOPs of one window, from the model's current kernel shapes."""
    t = seqlen
    proj = 0
    attn = 0
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            proj += lin.in_features * lin.out_features
        attn += 2 * t * t * a.num_heads * a.head_dim
    vocab, hidden = model.embed_tokens.embedding.shape
    head = hidden * vocab
    return {"projection_params": proj, "lm_head_params": head,
            "projections": 2 * t * proj, "lm_head": 2 * t * head, "attention": attn,
            "total": 2 * t * (proj + head) + attn}


def prepare_nnxprune(model, windows: np.ndarray, batch_size: int):
    """The scorer `score_windows` uses, compiled once and run once on the first batch, untimed, as
    transformers is: `(one_pass() -> NLL sum, compile seconds, warm-up s)`."""
    from nnxprune.evaluate.perplexity import compile_scorer

    n, seqlen = windows.shape
    bs = min(batch_size, n)
    t0 = time.perf_counter()
    compiled, state = compile_scorer(model, bs, seqlen)
    compile_seconds = time.perf_counter() - t0

    def one_pass() -> float:
        total = 0.0
        for start in range(0, n, bs):  # the loop of score_windows, ragged tail padded and masked
            batch = windows[start:start + bs]
            weight = np.ones(bs, np.float32)
            if len(batch) < bs:
                weight[len(batch):] = 0.0
                batch = np.concatenate([batch, np.repeat(batch[:1], bs - len(batch), axis=0)])
            total += float(compiled(state, jnp.asarray(batch, jnp.int32), jnp.asarray(weight)))
        return total

    t0 = time.perf_counter()
    # the first execution of a compiled program costs more than the later ones (the JSON keeps
    # it as *_warmup_seconds); `nnxprune eval` counts it in its tokens/s
    float(compiled(state, jnp.asarray(windows[:bs], jnp.int32), jnp.ones(bs, jnp.float32)))
    return one_pass, compile_seconds, time.perf_counter() - t0


def prepare_transformers(hf_model, torch, windows: np.ndarray, batch_size: int):
    """transformers on the same batches, NLL = float32 log-softmax summed: `(one_pass, warm-up s)`."""
    n, seqlen = windows.shape
    bs = min(batch_size, n)

    def run(rows) -> float:
        x = torch.from_numpy(rows.astype(np.int64))
        logits = hf_model(x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                x[:, 1:].reshape(-1), reduction="sum")
        return float(nll)

    def one_pass() -> float:
        with torch.inference_mode():
            return sum(run(windows[start:start + bs]) for start in range(0, n, bs))

    t0 = time.perf_counter()
    with torch.inference_mode():
        run(windows[:bs])  # warm-up (allocator, oneDNN primitive caches), not timed
    return one_pass, time.perf_counter() - t0


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--data-dir", default=None, help="default: $NNXPRUNE_DATA_DIR, else the hub")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/eval_speed.json")
    args = ap.parse_args(argv)

    import torch

    from nnxprune import data as data_lib
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io.load import load_model

    machine = machine_info()
    equal_threads()  # torch's intra-op threads = XLA's CPU pool (the schedulable cores)
    threads = {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
               "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
               "torch_num_threads": torch.get_num_threads(),
               "torch_num_interop_threads": torch.get_num_interop_threads(),
               "jax_devices": [str(d) for d in jax.devices()]}
    print(f"threads: OPENBLAS_NUM_THREADS={threads['OPENBLAS_NUM_THREADS']} "
          f"OMP_NUM_THREADS={threads['OMP_NUM_THREADS']} XLA_FLAGS={threads['XLA_FLAGS']} "
          f"torch.get_num_threads()={threads['torch_num_threads']} jax.devices()={threads['jax_devices']} "
          f"cpus={machine['affinity']} ({machine['cpu']}) loadavg={machine['loadavg_start']}", flush=True)
    if machine["affinity"] and machine["loadavg_start"][0] > machine["affinity"]:
        print(f"warning: load average {machine['loadavg_start'][0]:.1f} > {machine['affinity']} CPUs: "
              "other processes compete for the cores; the timings (transformers' OpenMP threads most "
              "of all) will be slower and noisier than on an idle machine", flush=True)

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    protocol = protocol_for(args.dataset, seqlen=args.seqlen, max_windows=args.windows,
                            batch_size=args.batch_size)
    stream = data_lib.token_stream(protocol, loaded.tokenizer, data_lib.resolve_data_dir(args.data_dir))
    windows = data_lib.windows(stream, protocol)
    n = windows.shape[0]
    tokens = windows.size
    print(f"model {args.model} loaded in {load_seconds:.1f}s; {protocol.describe()}; {n} windows",
          flush=True)

    flops = matmul_flops_per_window(loaded.model, args.seqlen)
    total_flops = flops["total"] * n

    # The three measurements are interleaved, one repeat of each in turn, so that load from other
    # processes on a shared machine hits all of them alike; each is the median over its repeats.
    d = loaded.model.config.hidden_size
    f = loaded.model.config.layers[0].intermediate_size
    shapes = {f"{args.seqlen * args.batch_size}x{d}x{f}": (args.seqlen * args.batch_size, d, f),
              "2048x2048x2048": (2048, 2048, 2048)}
    nnx_pass, compile_seconds, warmup = prepare_nnxprune(loaded.model, windows, args.batch_size)
    print(f"nnxprune compiled in {compile_seconds:.1f}s", flush=True)
    hf_pass = None
    if not args.skip_transformers:
        import transformers

        from nnxprune.io.hf import export_hf

        with tempfile.TemporaryDirectory() as tmp:
            folder = export_hf(loaded.model, Path(tmp) / "hf")
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32).eval()
        hf_pass, warmup_seconds = prepare_transformers(hf_model, torch, windows, args.batch_size)
        theirs = {"seconds": [], "warmup_seconds": warmup_seconds,
                  "attn_implementation": hf_model.config._attn_implementation,
                  "transformers": transformers.__version__, "torch": torch.__version__}
    ours = {"seconds": [], "compile_seconds": compile_seconds, "warmup_seconds": warmup}
    # JAX's matmul rate (XLA's defaults) per shape: the floor is the best of them
    rate_runs = {name: [] for name in shapes}
    torch_rate_runs = {name: [] for name in shapes}
    for r in range(args.repeats):
        for name, shape in shapes.items():
            rate_runs[name].append(time_matmul(*shape, repeats=5))
            if hf_pass is not None:  # torch's own GEMM on the same shape: transformers' floor
                torch_rate_runs[name].append(torch_matmul_rate(*shape))
        sec, total = timed(nnx_pass)
        ours["seconds"].append(sec)
        ours.setdefault("nll", total / (n * (args.seqlen - 1)))
        msg = f"repeat {r + 1}/{args.repeats}: nnxprune {sec:.2f}s"
        if hf_pass is not None:
            sec, total = timed(hf_pass)
            theirs["seconds"].append(sec)
            theirs.setdefault("nll", total / (n * (args.seqlen - 1)))
            msg += f", transformers {sec:.2f}s"
        msg += ", matmul " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rate_runs.items()) + " GFLOP/s"
        if hf_pass is not None:
            msg += " (torch " + ", ".join(f"{v[-1]:.1f}" for v in torch_rate_runs.values()) + ")"
        print(msg, flush=True)
    rates = {name: median(v) for name, v in rate_runs.items()}
    matmul_gflops = max(rates.values())
    floor_seconds = total_flops / (matmul_gflops * 1e9)
    ours["median_seconds"] = median(ours["seconds"])
    ours["ppl"] = math.exp(ours["nll"])
    if hf_pass is None:
        theirs = None
    else:
        theirs["median_seconds"] = median(theirs["seconds"])
        theirs["ppl"] = math.exp(theirs["nll"])
        del hf_model, hf_pass

    ours_tps = tokens / ours["median_seconds"]
    ours_gflops = total_flops / ours["median_seconds"] / 1e9
    result = {
        "model": args.model,
        "protocol": protocol.to_dict(),
        "windows": n,
        "tokens": int(tokens),
        "repeats": args.repeats,
        "nnxprune_seconds": ours["median_seconds"],
        "nnxprune_seconds_runs": ours["seconds"],
        "nnxprune_compile_seconds": ours["compile_seconds"],
        "nnxprune_warmup_seconds": ours["warmup_seconds"],
        "nnxprune_tokens_per_second": ours_tps,
        "ppl_nnxprune": ours["ppl"],
        "matmul_gflops": matmul_gflops,
        "matmul_gflops_by_shape": rates,
        "matmul_gflops_runs": rate_runs,
        "flops_per_window": flops,
        "flops_formula": FLOPS_FORMULA,
        "floor_seconds": floor_seconds,
        "achieved_gflops": ours_gflops,
        "floor_ratio": ours["median_seconds"] / floor_seconds,
        "threads": threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
    }
    if theirs is not None:
        hf_tps = tokens / theirs["median_seconds"]
        result.update({
            "transformers_seconds": theirs["median_seconds"],
            "transformers_seconds_runs": theirs["seconds"],
            "transformers_warmup_seconds": theirs["warmup_seconds"],
            "transformers_tokens_per_second": hf_tps,
            "transformers_achieved_gflops": total_flops / theirs["median_seconds"] / 1e9,
            "transformers_floor_ratio": theirs["median_seconds"] / floor_seconds,
            "torch_matmul_gflops_by_shape": {k: median(v) for k, v in torch_rate_runs.items()},
            "torch_matmul_gflops_runs": torch_rate_runs,
            "torch_floor_ratio": theirs["median_seconds"] / (
                total_flops / (max(median(v) for v in torch_rate_runs.values()) * 1e9)),
            "transformers_attn_implementation": theirs["attn_implementation"],
            "speed_ratio": ours_tps / hf_tps,
            "ppl_transformers": theirs["ppl"],
            "ppl_rel_diff": abs(ours["ppl"] / theirs["ppl"] - 1),
        })
        result["machine"].update(transformers=theirs["transformers"], torch=theirs["torch"])
    result["machine"]["loadavg_end"] = list(os.getloadavg())

    rows = [("nnxprune (JAX, jit)", ours["median_seconds"], ours_tps, ours["ppl"], ours_gflops,
             result["floor_ratio"])]
    if theirs is not None:
        rows.append((f"transformers {theirs['transformers']} ({theirs['attn_implementation']}, fp32)",
                     theirs["median_seconds"], result["transformers_tokens_per_second"],
                     theirs["ppl"], result["transformers_achieved_gflops"],
                     result["transformers_floor_ratio"]))
    rows.append((f"matmul floor ({matmul_gflops:.1f} GFLOP/s)", floor_seconds, tokens / floor_seconds,
                 float("nan"), matmul_gflops, 1.0))
    print()
    print(f"{args.model}, {protocol.describe()}, {n} windows x {args.seqlen} tokens, "
          f"median of {args.repeats}; {flops['total'] / 1e9:.1f} GFLOP/window")
    print()
    print("| implementation | s (all windows) | tokens/s | ppl | GFLOP/s | x floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, sec, tps, ppl, gf, fr in rows:
        ppl_s = "" if math.isnan(ppl) else f"{ppl:.4f}"
        print(f"| {name} | {sec:.2f} | {tps:.0f} | {ppl_s} | {gf:.1f} | {fr:.2f} |")
    if theirs is not None:
        print("\ntorch's own fp32 matmul on the same shapes: " + ", ".join(
            f"{k} {v:.0f} GFLOP/s ({v / rates[k]:.2f}x JAX's)"
            for k, v in result["torch_matmul_gflops_by_shape"].items())
            + f"; transformers at {result['torch_floor_ratio']:.2f}x its own matmul floor")
        print(f"\nspeed ratio nnxprune/transformers: {result['speed_ratio']:.2f}x; "
              f"ppl nnxprune {ours['ppl']:.5f} vs transformers {theirs['ppl']:.5f} "
              f"(rel diff {result['ppl_rel_diff']:.1e})")
    busy = max(result["machine"]["loadavg_start"][0], result["machine"]["loadavg_end"][0])
    result["machine"]["busy"] = bool(machine["affinity"] and busy > machine["affinity"] + 0.5)
    print(f"nnxprune compile {ours['compile_seconds']:.1f}s (excluded); loadavg "
          f"{machine['loadavg_start']} -> {result['machine']['loadavg_end']}")

    out = Path(args.out)
    from nnxprune.io import atomic

    atomic.write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
