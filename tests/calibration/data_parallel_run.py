"""Run by test_data_parallel.py in a subprocess with 8 forced CPU devices (the XLA flag must be
set before jax is imported): the statistics of every collector and the arrays every
post-training method leaves (`parallel_common`), computed data-parallel over the 8 devices, and
SparseLLM's again with `NNXPRUNE_DATA_PARALLEL=0` (keys `one/...`), saved as .npz to the path
given; `NNXPRUNE_DATA_PARALLEL` must be unset (auto) when it starts."""

import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import parallel_common as pc  # noqa: E402

from nnxprune.calibration import parallel  # noqa: E402

assert jax.device_count() == 8, jax.devices()
split = parallel.data_parallel(*pc.CASES["two_per_device"])
assert split is not None and split.devices == 8 and split.rows == 32, split  # on, 2 batches each
assert parallel.data_parallel(*pc.CASES["padded"]).rows == 32  # 3 real batches of 4, 5 padding
os.environ[parallel.ENV] = "0"
assert parallel.data_parallel(16, 2) is None  # the switch keeps one device
del os.environ[parallel.ENV]

out = {}
for case in pc.CASES:
    out.update(pc.statistics(case))
out.update(pc.pruned("two_per_device", pc.METHODS))
out.update(pc.pruned("padded", ("wanda", "sparsegpt")))
os.environ[parallel.ENV] = "0"  # SparseLLM again on one device of this 8-device process
out.update(pc.pruned("two_per_device", ("sparsellm",), prefix="one/"))
np.savez(sys.argv[1], **out)
print(f"saved {len(out)} arrays")
