"""Measurements every floor may take: parameter counts, measured sparsity, peak memory, hashes.

The lowest floor of the library besides `errors` and `layers`: it imports no other nnxprune
module that could import it back, so transforms, recovery and the runner all read it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def count_params(model) -> int:
    """Number of parameters (`nnx.Param` elements; masks are not parameters)."""
    import jax
    from flax import nnx

    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def source_hash(path: Path) -> str | None:
    """sha256 of a checkpoint file (or of a folder's weight files, in name order)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".gguf", ".json"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


class PeakMemory:
    """Peak resident memory (bytes) of this process while the block runs, polled from /proc.

    `ru_maxrss` cannot be reset, so a background thread samples VmRSS every `interval` seconds;
    on systems without /proc it reports the lifetime peak from `resource` instead.
    """

    def __init__(self, interval: float = 0.05):
        self.interval, self.start, self.peak, self._stop = interval, 0, 0, None

    @staticmethod
    def current() -> int:
        rss = _proc_status("VmRSS")
        if rss is not None:
            return rss
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        import threading

        self.start = self.peak = self.current()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self.current())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def measured_sparsity(model) -> dict[str, Any]:
    """Exact zeros of every decoder-layer projection (masks applied): overall and per matrix."""
    import numpy as np
    from flax import nnx

    from nnxprune.layers import Linear

    per_matrix, zeros, total = {}, 0, 0
    for path, node in nnx.iter_modules(model):
        if isinstance(node, Linear) and path and path[0] == "layers":
            kernel = np.asarray(node.effective_kernel())
            z = int(np.count_nonzero(kernel == 0))
            per_matrix[".".join(map(str, path))] = z / kernel.size
            zeros, total = zeros + z, total + kernel.size
    return {"overall": zeros / total if total else 0.0, "per_matrix": per_matrix}


def _proc_status(field: str) -> int | None:
    """A `/proc/self/status` memory field (`VmRSS`, `VmHWM`) in bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started: `VmHWM` from /proc on Linux, else
    `ru_maxrss` (KiB on Linux, bytes on macOS). It cannot be reset: it covers everything the
    process did (loading, evaluation, saving, every thread). `VmHWM` belongs to the program's own
    address space; `ru_maxrss` also carries the peak of whatever ran in the process before its
    exec (with `subprocess`'s vfork, the parent's peak), so it is only the fallback."""
    import resource
    import sys

    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_peaks() -> dict[str, float | None]:
    """The memory figures every `prune` and `train` report carries, in GB (10^9 bytes):

    - `peak_rss_gb`: the process's peak resident memory since it started (`peak_rss_bytes`),
      the number to compare with the machine's memory;
    - `device_peak_gb`: the peak bytes in use on the first local accelerator since the process
      started (JAX's `memory_stats()["peak_bytes_in_use"]`); None on CPU, where JAX keeps none.

    `peak_memory_bytes` in a `prune` report is another figure: the highest resident memory
    polled while the pruning pipeline ran (`PeakMemory`), the transforms alone."""
    import jax

    device = None
    try:
        stats = jax.local_devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            device = stats["peak_bytes_in_use"] / 1e9
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        device = None
    return {"peak_rss_gb": peak_rss_bytes() / 1e9, "device_peak_gb": device}
