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
of hanging in a collective or aborting with JAX's stack trace. A process that stops on an error
it can name (bad input seen by it alone: a `UserError`, an interruption, an uncaught exception)
says so first (`fail`): every other process then prints one line naming it and its reason and
exits with its exit status within about a second, and the failing process exits at once instead
of waiting in JAX's shutdown barrier for peers that will never reach it.

Example (two processes on one machine):
    XLA_FLAGS=--xla_force_host_platform_device_count=2 nnxprune train CKPT --recipe R --out OUT \\
        --distributed --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0   # and 1
"""

from __future__ import annotations

import dataclasses
import os
import traceback
import sys
import threading
import time

from nnxprune.errors import UserError

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
HEARTBEAT_SECONDS = 10  # a silent peer is declared dead after this long (`_watch`)
# At exit, how long a process waits in JAX's shutdown barrier for the others to finish too:
# process 0 alone writes the report and renders its views, which can take minutes for a big
# model while the others already wait (30 s was seen to run out on a loaded 2-core machine,
# aborting both). A peer that dies meanwhile is still caught by `_watch`.
SHUTDOWN_SECONDS = 900
EXIT_PEER_LOST = 1
_TEXT_BYTES = 4096  # agree_text's buffer
_joined = False
_failing = False  # this process called `fail`: its watchdog says nothing more
_watch_stop = threading.Event()  # set at exit: the watchdog returns (`_stop_watch`)


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
    _stop(label, f"another process of this --distributed run stopped ({reason}); nothing was "
                 f"written but a training run's checkpoints: rerun all processes (training resumes "
                 f"from the last one)", EXIT_PEER_LOST)


def _stop(label: str, message: str, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"{label}: error: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def _peer_failed(client, i: int, me: int, label: str) -> None:
    """Ends this process with one line if process `i` said it failed (`fail`); acknowledges it
    first, so that a failing coordinator knows it may go."""
    said = _try_get(client, f"nnxprune/failed/{i}")
    if said is None or _failing:
        return
    code, _, reason = said.partition("\n")
    client.key_value_set(f"nnxprune/seen/{me}", "1", allow_overwrite=True)
    _let_others_see(client, me)
    _stop(label, f"process {i} of this --distributed run stopped: {reason}",
          int(code) if code.isdigit() else EXIT_PEER_LOST)


def _watch(client, me: int, count: int, label: str) -> None:
    """Every second: bumps this process's counter in the coordinator's key-value store and reads
    the others'. A peer that said it failed (`fail`), a peer whose counter stood still for
    `HEARTBEAT_SECONDS` (and that did not call `done`), or a coordinator that stopped answering as
    long, ends this process with one line. (JAX's own heartbeat, set longer, would abort with a
    stack trace; its C++ callback cannot be replaced from Python in jaxlib 0.10.)"""
    seen = {i: (None, time.monotonic()) for i in range(count) if i != me}
    last_ok, beat = time.monotonic(), 0
    while not _watch_stop.is_set():
        beat += 1
        now = time.monotonic()
        try:
            client.key_value_set(f"nnxprune/alive/{me}", str(beat), allow_overwrite=True)
            for i, (value, since) in list(seen.items()):
                _peer_failed(client, i, me, label)
                if _has(client, i):  # finished: its silence is no failure
                    seen.pop(i)
                    continue
                current = _try_get(client, f"nnxprune/alive/{i}")
                if current != value:
                    seen[i] = (current, now)
                elif now - since > HEARTBEAT_SECONDS and not _failing:
                    _lost(label, f"process {i} sent no heartbeat for {now - since:.0f} s")
            last_ok = now
        except Exception as e:  # noqa: BLE001 - the coordinator (process 0) is gone
            if now - last_ok > HEARTBEAT_SECONDS and not _failing:
                _lost(label, f"the coordinator stopped answering: {str(e).splitlines()[0][:120]}")
        _watch_stop.wait(1.0)


def _stop_watch(thread) -> None:
    """At exit, before JAX's own shutdown: the watchdog ends its last call and returns. A daemon
    thread still inside a JAX call when the interpreter finalizes is unwound by `pthread_exit`
    through C++ frames as it takes the GIL back, which aborts the process ("FATAL: exception not
    rethrown", exit -6) after its work is done."""
    _watch_stop.set()
    thread.join(timeout=2 * HEARTBEAT_SECONDS)


def _let_others_see(client, me: int) -> None:
    """Process 0 may hold the key-value store (JAX's coordination service runs inside it unless
    it is detached, `_detached_service`): before it exits, it waits until every other process saw
    a failure, failed or finished (at most `HEARTBEAT_SECONDS`), so that they stop with one line,
    not with JAX's fatal "the coordinator died". Any other process may go at once."""
    if me != 0:
        return
    import jax

    deadline = time.monotonic() + HEARTBEAT_SECONDS
    others = list(range(1, jax.process_count()))
    while others and time.monotonic() < deadline:
        others = [i for i in others if not any(_try_get(client, f"nnxprune/{k}/{i}") is not None
                                                for k in ("seen", "failed", "done"))]
        time.sleep(0.2)


def fail(reason: str, code: int) -> None:
    """This process stops on an error (`reason`, one line, already shown to the user): in a
    multi-process run, tells the others (each prints one line naming this process and `reason`
    and exits with `code`) and exits with `code` now (process 0 once the others saw it,
    `_let_others_see`), instead of waiting in JAX's shutdown barrier for peers that will never
    reach it. No-op in a 1-process run."""
    global _failing
    client = _client()
    if not _joined or client is None:
        return
    import jax

    _failing = True
    reason = " ".join(str(reason).split())[:_TEXT_BYTES]
    try:
        me = jax.process_index()
        client.key_value_set(f"nnxprune/failed/{me}", f"{code}\n{reason}", allow_overwrite=True)
        _let_others_see(client, me)
    except Exception:  # noqa: BLE001 - the coordinator is gone: nobody left to tell
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _excepthook(kind, value, tb) -> None:
    """An uncaught exception in a multi-process run: the traceback as usual, then `fail`."""
    traceback.print_exception(kind, value, tb)
    first = (str(value).strip().splitlines() or [""])[0][:200]
    fail(f"{kind.__name__}: {first}" if first else kind.__name__, 1)


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
    `_watch` (longer, so that the one-line exit comes first). Process 0 of a cluster given by
    address serves the coordination service from its own process (`_detached_service`)."""
    import jax

    bind = None
    if cluster.process_id == 0 and cluster.coordinator and (cluster.num_processes or 0) > 1:
        _detached_service(cluster)
        bind = "127.0.0.1:0"  # JAX still starts one in process 0: unused, on a free port
    jax.distributed.initialize(
        cluster.coordinator, num_processes=cluster.num_processes, process_id=cluster.process_id,
        coordinator_bind_address=bind, heartbeat_timeout_seconds=4 * HEARTBEAT_SECONDS,
        shutdown_timeout_seconds=SHUTDOWN_SECONDS)


def _detached_service(cluster: Cluster) -> None:
    """Starts JAX's coordination service (the key-value store and barriers every process talks
    to) in a process of its own, in a session of its own, so that it outlives process 0: when
    process 0 is killed, the others' watchdogs then see its heartbeat stop and exit with one
    line, where a service inside process 0 would die with it and JAX would abort every other
    process at once with a fatal C++ error and stack trace (jaxlib 0.10 gives Python no say
    there). The service ends when process 0 does: 2 s after a clean exit, `2 *
    HEARTBEAT_SECONDS` after any other (time for the others to notice). A port in use is a
    UserError."""
    import atexit
    import subprocess
    import tempfile

    port = cluster.coordinator.rpartition(":")[2]
    log = tempfile.TemporaryFile()  # the service's own log lines, shown only if it cannot start
    proc = subprocess.Popen(
        [sys.executable, "-m", "nnxprune.multihost", f"[::]:{port}", str(cluster.num_processes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    if proc.stdout.readline().strip() != b"ready":
        proc.wait()
        log.seek(0)
        said = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
        raise UserError(f"--coordinator {cluster.coordinator}: cannot serve on port {port} "
                        f"({(said or ['no reason given'])[-1].strip()[:200]}); is it in use?")

    def clean_exit():  # registered before JAX's own shutdown, so it runs after it
        try:
            proc.stdin.write(b"done\n")
            proc.stdin.flush()
        except OSError:
            pass
    atexit.register(clean_exit)


def _serve(address: str, count: int) -> None:
    """`python -m nnxprune.multihost ADDRESS N`: the detached coordination service."""
    from jax._src.lib import _jax

    service = _jax.get_distributed_runtime_service(
        address, count, heartbeat_timeout=4 * HEARTBEAT_SECONDS, shutdown_timeout=SHUTDOWN_SECONDS)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    clean = sys.stdin.readline().strip() == "done"  # blocks until process 0 is gone
    time.sleep(2 if clean else 2 * HEARTBEAT_SECONDS)
    service.shutdown()


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
    if _joined:
        sys.excepthook = _excepthook
    if _joined and _client() is not None:
        import atexit

        watchdog = threading.Thread(target=_watch, args=(_client(), jax.process_index(),
                                                         jax.process_count(), label),
                                    daemon=True, name="nnxprune-peers")
        watchdog.start()
        atexit.register(_stop_watch, watchdog)  # runs before JAX's shutdown (registered earlier)
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


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
