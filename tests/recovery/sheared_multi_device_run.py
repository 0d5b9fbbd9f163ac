"""Run by test_sheared.py in a subprocess with 8 simulated CPU devices (the XLA flag must be set
before jax is imported): the shared tiny Sheared LLaMA pruning run on a (2, 2, 2) mesh; prints
its per-step losses and expected parameter counts as JSON."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

from test_sheared import mesh_run  # noqa: E402

assert jax.device_count() == 8, jax.devices()
result = mesh_run({"data": 2, "fsdp": 2, "tensor": 2})
print("RESULT " + json.dumps({"loss": [h["loss"] for h in result.history],
                              "expected_params": [h["expected_params"] for h in result.history],
                              "mesh": result.mesh}))
