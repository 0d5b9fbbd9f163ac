"""Run by test_dynamic.py in a subprocess with 8 simulated CPU devices (the XLA flag must be set
before jax is imported): trains the shared tiny domain run (dynamic batch loading) on a (2, 2, 2)
mesh and prints its losses and domain report as JSON."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

from recovery_common import DOMAIN_MESH_RUN, config, domain_windows, tiny_model  # noqa: E402
from nnxprune.recovery import train  # noqa: E402

assert jax.device_count() == 8, jax.devices()
result = train(tiny_model(), config(**DOMAIN_MESH_RUN, mesh={"data": 2, "fsdp": 2, "tensor": 2}),
               windows=domain_windows(), progress=False)
print("RESULT " + json.dumps({"losses": result.losses, "domains": result.domains,
                              "mesh": result.mesh}))
