"""Shared pieces of the benchmark scripts: machine description and the matmul-rate floor."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path


def median(xs) -> float:
    return float(statistics.median(xs))


def time_matmul(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Median GFLOP/s of a jitted fp32 `[m,k] @ [k,n]` (operands already on device), compiled with
    XLA's defaults."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (k, n), jnp.float32)
    lowered = jax.jit(jnp.dot).lower(a, b)
    f = lowered.compile()
    f(a, b).block_until_ready()
    times = []
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / median(times) / 1e9


def equal_threads() -> dict:
    """One thread count for both implementations: XLA's CPU pool takes the schedulable cores;
    torch gets as many intra-op threads."""
    import torch

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(n)
    return {"jax_xla_cpu_threads": n, "torch_num_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads()}


def torch_matmul_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Median GFLOP/s of torch's fp32 `[m,k] @ [k,n]` (MKL/oneDNN on CPU) at torch's current
    thread count."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    with torch.inference_mode():
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * m * k * n / median(times) / 1e9


def matmul_rate(repeats: int = 7) -> float:
    """This machine's fp32 JAX matmul rate (GFLOP/s) on a SmolLM2-sized MLP projection."""
    return time_matmul(1024, 576, 1536, repeats)


def machine_info() -> dict:
    import jax

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "loadavg_start": list(os.getloadavg())}


# --- pruning benchmarks (sparsity.py, sparsellm.py): one calibration draw, one protocol ---------

RESULTS = Path(__file__).resolve().parent / "results"


def add_pruning_args(parser, default_out: str) -> None:
    """The options every pruning benchmark shares: model, calibration draw, protocol, output."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    parser.add_argument("--out", default=str(RESULTS / default_out))


def prepare_pruning(args):
    """Loads the model, the evaluation windows and the calibration draw (timed), and scores the
    dense model. Returns a namespace with `loaded, protocol, windows, calib, draw_seconds,
    dense_row`."""
    from types import SimpleNamespace

    from nnxprune import data as data_lib
    from nnxprune.data import calibration_samples
    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.evaluate.protocol import protocol_for
    from nnxprune.io.load import load_model
    from nnxprune.measure import measured_sparsity

    loaded = load_model(args.model)
    data_dir = data_lib.resolve_data_dir(None)
    protocol = protocol_for("wikitext2", seqlen=args.eval_seqlen, max_windows=args.eval_windows)
    windows = data_lib.windows(data_lib.token_stream(protocol, loaded.tokenizer, data_dir), protocol)
    t0 = time.perf_counter()
    calib = calibration_samples(loaded.tokenizer, dataset="c4", nsamples=args.nsamples,
                                seqlen=args.seqlen, seed=args.seed, data_dir=data_dir)
    draw_seconds = time.perf_counter() - t0
    dense = score_windows(loaded.model, windows, protocol, progress=False)
    print(f"dense ppl {dense.ppl:.3f}", flush=True)
    dense_row = {"method": "dense", "pattern": "-", "ppl": dense.ppl,
                 "sparsity": measured_sparsity(loaded.model)["overall"]}
    return SimpleNamespace(loaded=loaded, protocol=protocol, windows=windows, calib=calib,
                           draw_seconds=draw_seconds, dense_row=dense_row)


def prune_and_score(setup, spec: dict):
    """Applies the transform `spec` to a copy of the dense model with the shared calibration draw
    and scores it. Returns `(row, report_entry)`: the row has pattern, ppl, measured sparsity,
    prune seconds and peak memory; the entry is the transform's own report."""
    from flax import nnx

    from nnxprune.evaluate.perplexity import score_windows
    from nnxprune.measure import PeakMemory, measured_sparsity
    from nnxprune.transforms import Context, from_dict

    transform = from_dict(spec)
    model = nnx.clone(setup.loaded.model)
    transform.check(model.config)
    ctx = Context(tokens=setup.calib.tokens, progress=False)
    t0 = time.perf_counter()
    with PeakMemory() as memory:
        transform(model, ctx)
    seconds = time.perf_counter() - t0
    entry = ctx.report["transforms"][-1]
    result = score_windows(model, setup.windows, setup.protocol, progress=False)
    pattern = spec.get("pattern") or f"{float(spec['sparsity']):.0%}"
    row = {"method": spec["kind"], "pattern": pattern, "ppl": result.ppl,
           "sparsity": measured_sparsity(model)["overall"], "prune_seconds": seconds,
           "peak_memory_bytes": memory.peak, "memory_before_bytes": memory.start}
    if entry.get("damping_retries"):
        row["damping_retries"] = entry["damping_retries"]
    return row, entry


def pruning_report(benchmark: str, args, setup, **fields) -> dict:
    """The JSON header every pruning benchmark writes: model, date, machine, draw, protocol."""
    import datetime

    return {
        "benchmark": benchmark, "model": args.model, "source": setup.loaded.source,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "threads": {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
        "calibration": {"dataset": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seed": args.seed, "source": str(setup.calib.source),
                        "draw_seconds": setup.draw_seconds},
        "protocol": setup.protocol.to_dict(), "protocol_text": setup.protocol.describe(),
        **fields,
    }


def write_results(path, report: dict, markdown: str, quiet: bool = False) -> None:
    """Writes the JSON report and the Markdown table beside it, atomically (and prints the table
    unless `quiet`)."""
    from nnxprune.io import atomic

    if not quiet:
        print(markdown)
    atomic.write_json(path, report)
    atomic.write_text(Path(path).with_suffix(".md"), markdown)
