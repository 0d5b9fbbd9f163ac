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
    """Median GFLOP/s of a jitted fp32 `[m,k] @ [k,n]` (operands already on device)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (k, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
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
