"""Run by test_multiprocess_calibration.py as each of 2 processes (2 forced CPU devices each):
joins the 2-process runtime on 127.0.0.1 (`multihost.join`, collectives over gloo), then gathers
every collector's statistics and runs Wanda and SparseGPT data-parallel over the 4-device mesh
(`parallel_common`); saves the arrays as .npz.

Usage: multiprocess_calibration_run.py PORT PROCESS_ID OUT.npz
"""

import os
import sys

assert "--xla_force_host_platform_device_count=2" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import parallel_common as pc  # noqa: E402

from nnxprune import multihost  # noqa: E402
from nnxprune.calibration import parallel  # noqa: E402

port, me, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
multihost.join(multihost.Cluster(f"127.0.0.1:{port}", 2, me), label="calibration test")
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
assert parallel.data_parallel(*pc.CASES["two_per_device"]).devices == 4
out = {}
for case in ("two_per_device", "padded"):  # 4 batches per device; 3 batches over 4 devices
    out.update(pc.statistics(case))
out.update(pc.pruned("two_per_device", ("wanda", "sparsegpt")))
np.savez(path, **out)
multihost.done()
multihost.barrier("calibration test done")
