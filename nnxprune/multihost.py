"""One program, many processes (`--distributed`): the options, joining JAX's runtime, process 0.

Every process of a multi-process run executes the same command. They find each other through
`jax.distributed.initialize`, given by `--coordinator HOST:PORT --num-processes N --process-id I`
(each also read from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); what is
still missing is left to JAX's own cluster detection (SLURM, Open MPI, TPU pod slices). The options
are checked (`cluster_from`) before any work. On CPU the processes reduce over gloo
(`jax_cpu_collectives_implementation`), so two processes on one machine are a real test.

After `join`, arrays are global; only process 0 prints, shows progress bars and writes files
(`is_primary`; `io.atomic` writes nothing on the others, and an atomic folder is filled by all
processes under one agreed temporary name, `agree_text`, then renamed by process 0 alone).

A process that stops (killed, crashed, its machine gone) is noticed by the others within
`HEARTBEAT_SECONDS`; each of them then prints one line and exits with `EXIT_PEER_LOST`, instead
of hanging in a collective or aborting with JAX's stack trace.

Example (two processes on one machine):
    XLA_FLAGS=--xla_force_host_platform_device_count=2 nnxprune train CKPT --recipe R --out OUT \\
        --distributed --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0   # and 1
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time

from nnxprune.errors import UserError

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
HEARTBEAT_SECONDS = 10  # a silent peer is declared dead after this long (`_watch`)
SHUTDOWN_SECONDS = 30  # at exit, how long a process waits for the others to finish too
EXIT_PEER_LOST = 1
_TEXT_BYTES = 4096  # agree_text's buffer
_joined = False


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where the processes meet; None fields are left to JAX's cluster detection."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def add_arguments(p) -> None:
    """`--distributed` and its options, on an argparse parser."""
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run (jax.distributed.initialize) first: every process "
                        "runs the same command; options below, else SLURM / Open MPI / TPU detection")
    p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help=f"process 0's address and a free port (default: ${ENV['coordinator']})")
    p.add_argument("--num-processes", metavar="N", default=None,
                   help=f"number of processes (default: ${ENV['num_processes']})")
    p.add_argument("--process-id", metavar="I", default=None,
                   help=f"this process, 0 to N-1 (default: ${ENV['process_id']})")


def _integer(value: str, where: str, low: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UserError(f"{where}: expected an integer, got {value!r}") from None
    if number < low:
        raise UserError(f"{where} must be at least {low}, got {number}")
    return number


def _check_coordinator(value: str, where: str) -> str:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host.strip("[]"):
        raise UserError(f"{where}: expected HOST:PORT (e.g. 127.0.0.1:12345), got {value!r}")
    number = _integer(port, f"{where} port", 1)
    if number > 65535:
        raise UserError(f"{where}: port {number} is out of range (1-65535)")
    return value.strip()


def cluster_from(args, environ=None) -> Cluster | None:
    """The checked cluster options of a command (None without `--distributed`); UserError on a bad
    value, or on an option given without `--distributed`."""
    environ = os.environ if environ is None else environ
    given = {name: getattr(args, name, None) for name in ENV}
    if not getattr(args, "distributed", False):
        extra = [f"--{n.replace('_', '-')}" for n, v in given.items() if v is not None]
        if extra:
            raise UserError(f"{', '.join(extra)} only apply with --distributed")
        return None
    values: dict = {}
    for name, value in given.items():
        where = f"--{name.replace('_', '-')}"
        if value is None and environ.get(ENV[name], "").strip():
            value, where = environ[ENV[name]], f"${ENV[name]}"
        if value is None:
            values[name] = None
        elif name == "coordinator":
            values[name] = _check_coordinator(value, where)
        else:
            values[name] = _integer(value, where, 1 if name == "num_processes" else 0)
    n, i = values["num_processes"], values["process_id"]
    if n is not None and i is not None and i >= n:
        raise UserError(f"--process-id {i} is not below --num-processes {n} (ids run 0 to {n - 1})")
    return Cluster(**values)


def _lost(label: str, reason: str) -> None:
    sys.stderr.write(f"{label}: error: another process of this --distributed run stopped ({reason}); "
                     f"the last checkpoint in the train dir is kept, rerun all processes to resume\n")
    sys.stderr.flush()
    os._exit(EXIT_PEER_LOST)


def _watch(client, me: int, count: int, label: str) -> None:
    """Every second: bumps this process's counter in the coordinator's key-value store and reads
    the others'. A peer whose counter stood still for `HEARTBEAT_SECONDS` (and that did not call
    `done`), or a coordinator that stopped answering as long, ends this process with one line.
    (JAX's own heartbeat, set longer, would abort with a stack trace; its C++ callback cannot be
    replaced from Python in jaxlib 0.10.)"""
    seen = {i: (None, time.monotonic()) for i in range(count) if i != me}
    last_ok, beat = time.monotonic(), 0
    while True:
        beat += 1
        now = time.monotonic()
        try:
            client.key_value_set(f"nnxprune/alive/{me}", str(beat), allow_overwrite=True)
            for i, (value, since) in list(seen.items()):
                if _has(client, i):  # finished: its silence is no failure
                    seen.pop(i)
                    continue
                current = _try_get(client, f"nnxprune/alive/{i}")
                if current != value:
                    seen[i] = (current, now)
                elif now - since > HEARTBEAT_SECONDS:
                    _lost(label, f"process {i} sent no heartbeat for {now - since:.0f} s")
            last_ok = now
        except Exception as e:  # noqa: BLE001 - the coordinator (process 0) is gone
            if now - last_ok > HEARTBEAT_SECONDS:
                _lost(label, f"the coordinator stopped answering: {str(e).splitlines()[0][:120]}")
        time.sleep(1.0)


def _try_get(client, key: str):
    try:
        return client.key_value_try_get(key)
    except Exception:  # noqa: BLE001 - not set yet
        return None


def _has(client, i: int) -> bool:
    return _try_get(client, f"nnxprune/done/{i}") is not None


def done() -> None:
    """This process finished its work: its silence from now on is not a failure."""
    client = _client()
    if _joined and client is not None:
        import jax

        client.key_value_set(f"nnxprune/done/{jax.process_index()}", "1", allow_overwrite=True)


def _client():
    try:
        from jax._src import distributed as _dist
        return _dist.global_state.client
    except (ImportError, AttributeError):
        return None


def _initialize(cluster: Cluster) -> None:
    """`jax.distributed.initialize` with bounded timeouts; JAX's heartbeat is the fallback of
    `_watch` (longer, so that the one-line exit comes first)."""
    import jax

    jax.distributed.initialize(
        cluster.coordinator, num_processes=cluster.num_processes, process_id=cluster.process_id,
        heartbeat_timeout_seconds=4 * HEARTBEAT_SECONDS, shutdown_timeout_seconds=SHUTDOWN_SECONDS)


def join(cluster: Cluster, *, label: str = "nnxprune", echo=print) -> None:
    """Joins the multi-process runtime (CPU collectives over gloo); a cluster that cannot be
    joined is a one-line UserError."""
    global _joined
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPU/TPU ignore it
    try:
        _initialize(cluster)
    except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError: XlaRuntimeError too
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--distributed: no JAX cluster to join ({reason}); give --coordinator, "
                        f"--num-processes and --process-id (or run under SLURM, Open MPI or on a "
                        f"TPU pod slice, where they are found), or drop --distributed") from None
    _joined = jax.process_count() > 1
    if _joined and _client() is not None:
        threading.Thread(target=_watch, args=(_client(), jax.process_index(), jax.process_count(),
                                              label), daemon=True, name="nnxprune-peers").start()
    if is_primary():
        echo(f"jax       process {jax.process_index()} of {jax.process_count()}, "
             f"{jax.device_count()} devices ({jax.local_device_count()} local)")


def joined() -> bool:
    """Whether this process is one of several (after `join`)."""
    return _joined


def is_primary() -> bool:
    """Process 0, or the only process: the one that prints and writes."""
    if not _joined:
        return True
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process got here (no-op in a 1-process run)."""
    if _joined:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree_text(text: str | None) -> str:
    """Process 0's `text`, in every process (a collective: all processes must call it)."""
    if not _joined:
        return text or ""
    import numpy as np
    from jax.experimental import multihost_utils

    data = (text or "").encode("utf-8")
    if len(data) > _TEXT_BYTES:
        raise ValueError(f"agree_text: {len(data)} bytes, at most {_TEXT_BYTES}")
    buf = np.zeros(_TEXT_BYTES + 4, np.uint8)
    buf[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
    buf[4:4 + len(data)] = np.frombuffer(data, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    size = int(np.frombuffer(out[:4].tobytes(), np.uint32)[0])
    return out[4:4 + size].tobytes().decode("utf-8")


def local_copy(tree):
    """Every global array of `tree` as an ordinary array of this process, holding the whole value
    (an all-gather; arrays already addressable are kept)."""
    if not _joined:
        return tree
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)
