"""Run by test_recovery_trainer.py in a subprocess with 8 simulated CPU devices (the XLA flag must
be set before jax is imported): trains the shared tiny run on a (2, 2, 2) mesh and prints its
losses and where every parameter and optimizer-state array was placed, as JSON."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

from recovery_common import MESH_RUN, config, tiny_model, windows  # noqa: E402
from nnxprune.errors import UserError  # noqa: E402
from nnxprune.recovery import train  # noqa: E402

assert jax.device_count() == 8, jax.devices()
result = train(tiny_model(), config(**MESH_RUN, mesh={"data": 2, "fsdp": 2, "tensor": 2}),
               windows=windows(), progress=False)
errors = {}
for name, mesh, batch in (("mesh", {"data": 3}, 8), ("batch", {"data": -1}, 4)):
    try:
        train(tiny_model(), config(**{**MESH_RUN, "batch_size": batch, "grad_accum": 1}, mesh=mesh),
              windows=windows(), progress=False)
    except UserError as e:
        errors[name] = str(e)
print("RESULT " + json.dumps({"losses": result.losses, "placement": result.placement,
                              "mesh": result.mesh, "errors": errors}))
