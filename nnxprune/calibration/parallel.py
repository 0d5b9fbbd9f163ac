"""Data-parallel calibration: the sequential driver's forwards split over the mesh's data axis.

The post-training methods (Wanda, SparseGPT, SparseLLM, OWL, ShortGPT's block influence,
Minitron's activation scores) gather their statistics in the sequential driver
(`nnxprune.calibration.sequential`). With more than one device visible (the local devices, or
every process's after `jax.distributed.initialize`), the driver hands its two forwards to a
`DataParallel` over a mesh of all devices, axis `data` (`nnxprune.recovery.sharding`'s name for
the batch split):

- the calibration activations `[N, T, D]` are one global array sharded over `data`; device `d`
  holds whole batches `d*k .. d*k + k - 1` of the 1-device run's `N / bs` batches of `bs`
  sequences (padded with whole batches, left out of every sum, when they do not split evenly);
  each process embeds only its own devices' rows;
- each device runs the 1-device program (`programs.batch_stats`, a scan over a batch's sequences
  from zero) on each of its batches, and the pruned layer's forward on its rows;
- the batch sums are added in the 1-device order, `((t0 + t1) + t2) + ...`: device 0 adds its
  batches, passes the running sum to device 1 (`lax.ppermute`), which adds its own, and so on;
  the last device's total is broadcast (`lax.psum` with zeros from the others, which is exact).
  Float addition is not associative, so a tree reduction (a plain `psum` of per-device sums)
  would move Hessians and norms in their last bits and could flip a mask entry where two scores
  are nearly tied; in this order every statistic equals the 1-device run's bit for bit, and so
  every mask does. The sequential chain costs `devices - 1` transfers of one statistic per
  layer, the compute (the layer forwards) is split over the devices.

Statistics come back as ordinary arrays on this process's first device, so `visit` prunes the
layer as on one device; in a multi-process run every process prunes its copy of the model with
the same statistics, and the copies stay equal. `NNXPRUNE_DATA_PARALLEL=0` keeps calibration on
one device (in every process).

Example:
    >>> split = data_parallel(sequences=128, batch_size=8)   # None with one device
    >>> x = split.embed(model, tokens)                       # [N, T, D] over the data axis
    >>> stats, outs = split.statistics(layer, plan, x, inv_freq, 8, False)
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nnxprune.calibration import programs
from nnxprune.errors import UserError

ENV = "NNXPRUNE_DATA_PARALLEL"
DATA = "data"  # the mesh axis that splits the batch (nnxprune.recovery.sharding.AXES[0])


def data_parallel(sequences: int, batch_size: int, devices=None) -> "DataParallel | None":
    """The data-parallel driver over `devices` (default: every device of every process), or None
    with one device or `NNXPRUNE_DATA_PARALLEL=0`. `batch_size` divides `sequences`."""
    setting = os.environ.get(ENV, "").strip().lower() or "auto"
    if setting not in ("0", "1", "auto"):
        raise UserError(f"${ENV} must be 0 (one device), 1 or auto (all devices), got {setting!r}")
    devices = jax.devices() if devices is None else list(devices)
    if setting == "0" or len(devices) < 2:
        return None
    from nnxprune.recovery.sharding import make_mesh

    mesh = make_mesh({DATA: len(devices), "fsdp": 1, "tensor": 1}, devices)
    return DataParallel(mesh=mesh, sequences=sequences, batch_size=batch_size)


def _first_local_device():
    return jax.local_devices()[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataParallel:
    """The calibration sequences split over `mesh`'s data axis (module docstring)."""

    mesh: Mesh
    sequences: int
    batch_size: int

    @property
    def devices(self) -> int:
        return int(self.mesh.shape[DATA])

    @property
    def batches(self) -> int:
        """The 1-device run's batches of `batch_size` sequences."""
        return self.sequences // self.batch_size

    @property
    def rows(self) -> int:
        """Sequences held over all devices: every device `k` whole batches, padding included."""
        return -(-self.batches // self.devices) * self.devices * self.batch_size

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def embed(self, model, tokens: np.ndarray) -> jax.Array:
        """The first layer's inputs `[rows, T, D]`, sharded over the data axis; each process
        embeds its own devices' rows (padding rows hold token 0)."""
        tokens = np.asarray(tokens, np.int32)
        padded = np.zeros((self.rows, tokens.shape[1]), np.int32)
        padded[:self.sequences] = tokens
        graphdef, state = nnx.split(model.embed_tokens)
        shape = (self.rows, tokens.shape[1], model.embed_tokens.embedding.shape[1])
        sharding = self._sharding(P(DATA))
        shards = [jax.device_put(programs.embed(graphdef, state, jnp.asarray(padded[index[0]])),
                                 device)
                  for device, index in sharding.addressable_devices_indices_map(shape).items()]
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    def replicated(self, tree):
        """`tree` (equal in every process) as global arrays replicated over the mesh."""
        sharding = self._sharding(P())
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)

        def put(a):
            host = np.asarray(a)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.tree.map(put, tree)

    def statistics(self, layer, plan: programs.Plan, x, inv_freq, bs: int, want_out: bool):
        """The finished statistics of `plan` over the sequences of `x` (the 1-device values, bit
        for bit, on this process's first device) and, when `want_out`, the layer's outputs
        (sharded like `x`)."""
        if bs != self.batch_size:
            raise ValueError(f"batch size {bs}, but the rows were split by {self.batch_size}")
        graphdef, state = programs.split_recording(layer, plan)
        run = _statistics_program(graphdef, plan, self.mesh, bs, self.batches, want_out)
        sums, stacked, outs = run(self.replicated(state), x, self.replicated(inv_freq))
        sums = jax.tree.map(self.local, sums)
        stacked = jax.tree.map(lambda a: self.gathered(a)[:self.sequences], stacked)
        stats = programs.finish(plan, sums, stacked, self.sequences, self.sequences * x.shape[1])
        jax.block_until_ready(stats)
        return stats, outs

    def forward(self, layer, x, inv_freq) -> jax.Array:
        """The layer on every row of `x`, each device on its own rows."""
        graphdef, state = nnx.split(layer)
        run = _forward_program(graphdef, self.mesh)
        return run(self.replicated(state), x, self.replicated(inv_freq)).block_until_ready()

    def local(self, a: jax.Array) -> jax.Array:
        """A replicated global array as an ordinary array on this process's first device."""
        device = _first_local_device()
        for shard in a.addressable_shards:
            if shard.device == device:
                return shard.data
        return jax.device_put(a.addressable_data(0), device)

    def gathered(self, a: jax.Array) -> jax.Array:
        """A sharded global array, whole, on this process's first device (an all-gather)."""
        if a.is_fully_addressable:
            return jax.device_put(a, _first_local_device())
        from jax.experimental import multihost_utils

        return jax.device_put(multihost_utils.process_allgather(a, tiled=True),
                              _first_local_device())

    def unpadded(self, a: jax.Array) -> jax.Array:
        """The real sequences of a `[rows, ...]` array (the array itself when none is padding)."""
        return a if self.rows == self.sequences else a[:self.sequences]


def _in_order(totals, valid, me, devices: int):
    """The sum of every device's batch `totals` (leading axis: its `k` batches; `valid`: which
    are real) in the 1-device order, on every device (module docstring)."""
    k = valid.shape[0]

    def fold(acc):  # this device's batches added to the running sum, in order
        for j in range(k):
            acc = jax.tree.map(lambda a, t: jnp.where(valid[j], a + t[j], a), acc, totals)
        return acc

    ring = [(d, (d + 1) % devices) for d in range(devices)]

    def step(s, acc):  # device s continues the sum of devices 0 .. s - 1
        received = jax.lax.ppermute(acc, DATA, ring)
        return jax.tree.map(lambda a, f: jnp.where(me == s, f, a), acc, fold(received))

    acc = jax.lax.fori_loop(1, devices, step, fold(jax.tree.map(
        lambda t: jnp.zeros(t.shape[1:], t.dtype), totals)))
    last = jax.tree.map(lambda a: jnp.where(me == devices - 1, a, jnp.zeros_like(a)), acc)
    return jax.lax.psum(last, DATA)  # x + 0 is x: the last device's sum, everywhere


@functools.lru_cache(maxsize=64)
def _statistics_program(graphdef, plan: programs.Plan, mesh: Mesh, bs: int, batches: int,
                        want_out: bool):
    """The jitted statistics forward over the mesh: `(state, x, inv_freq) -> (sums in order,
    stacked values, outputs)`."""
    devices = int(mesh.shape[DATA])

    def body(state, x, inv_freq):  # x: this device's rows, k batches of bs
        k = x.shape[0] // bs
        me = jax.lax.axis_index(DATA)
        totals, stacked, outs = jax.lax.map(
            lambda b: programs.batch_stats(graphdef, plan, state, b, want_out, inv_freq),
            x.reshape(k, bs, *x.shape[1:]))
        sums = _in_order(totals, me * k + jnp.arange(k) < batches, me, devices)
        rows = functools.partial(jax.tree.map, lambda a: a.reshape(k * bs, *a.shape[2:]))
        return sums, rows(stacked), rows(outs)

    # check_vma off: the 1-device scan starts from invariant zeros; the sums are replicated by
    # construction (one psum)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(DATA), P()),
                                 out_specs=(P(), P(DATA), P(DATA)), check_vma=False))


@functools.lru_cache(maxsize=64)
def _forward_program(graphdef, mesh: Mesh):
    """The jitted pruned forward over the mesh: each device's rows, one sequence at a time."""
    return jax.jit(jax.shard_map(functools.partial(programs.map_rows, graphdef), mesh=mesh,
                                 in_specs=(P(), P(DATA), P()), out_specs=P(DATA)))
