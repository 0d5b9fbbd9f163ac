"""The harness of the multi-process tests (tests/recovery/test_multiprocess*.py,
tests/calibration/test_multiprocess_calibration.py): two processes on localhost, each with 2
forced CPU devices, join one 4-device mesh over gloo through a coordinator on a free port. Every
wait is bounded (`TIMEOUT`) and every process is killed at the end, whatever happened; what
gloo and XLA print of their own is filtered out of the outputs (`own_lines`).

Example:
    >>> with launched(tmp_path, nnxprune(["train", folder, "--recipe", recipe])) as procs:
    ...     codes = wait(procs)
    >>> out0, err0 = outputs(tmp_path, 0)
"""

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from nnxprune import multihost

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds for a 2-process run (50-150 s alone on 2 cores; 300 s seen under load)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(drop=()) -> dict[str, str]:
    """This process's environment for a child: no cluster variables (`multihost.ENV`) nor the
    names in `drop`, 2 forced CPU devices, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in multihost.ENV.values() and k not in drop}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


def nnxprune(argv) -> list:
    """`python -m nnxprune.cli ARGV --distributed` as process <ID> of 2 (`launched` fills in the
    placeholders)."""
    return ["-m", "nnxprune.cli", *argv, "--distributed", "--coordinator", "127.0.0.1:<PORT>",
            "--num-processes", "2", "--process-id", "<ID>"]


@contextlib.contextmanager
def launched(cwd: Path, argv, *, extra=None, drop=()):
    """Two `python ARGV` processes in `cwd`, stdout and stderr to `p{i}.out` / `p{i}.err`: in
    `argv`, <ID> becomes the process id and <PORT> the coordinator's (free) port; process i gets
    `extra[i]` appended, if given. Yields them; kills what is left at the end."""
    port, procs = free_port(), []
    try:
        for i in range(2):
            args = [str(a).replace("<PORT>", str(port)).replace("<ID>", str(i))
                    for a in [*argv, *(extra or {}).get(i, [])]]
            with open(cwd / f"p{i}.out", "w") as out, open(cwd / f"p{i}.err", "w") as err:
                procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd,
                                              env=environment(drop), stdout=out, stderr=err))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


def outputs(cwd: Path, i: int) -> tuple[str, str]:
    """Process i's (stdout, stderr)."""
    return (cwd / f"p{i}.out").read_text(), (cwd / f"p{i}.err").read_text()


def wait(procs, start: float | None = None) -> list[int]:
    """Their exit codes, all within `TIMEOUT` seconds of `start` (default: now)."""
    deadline = (time.monotonic() if start is None else start) + TIMEOUT
    return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]


def two_processes(cwd: Path, argv, meanwhile=lambda: None, **kw) -> list[tuple[str, str]]:
    """Runs both to the end (bounded), calling `meanwhile` while they run (a 1-process twin uses
    the cores they leave idle); returns their (stdout, stderr); both must exit 0."""
    t0 = time.monotonic()
    with launched(cwd, argv, **kw) as procs:
        meanwhile()
        codes = wait(procs, t0)
    outs = [outputs(cwd, i) for i in range(2)]
    assert codes == [0, 0], (codes, *(no_stack(err)[-3000:] for _, err in outs))
    return outs


def no_stack(text: str) -> str:
    """stderr without the frames of a C++ stack trace (JAX's fatal errors print one)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("    @ "))


# gloo's C++ prints "[Gloo] Rank R is connected to N peer ranks. Expected number of connected peer
# ranks is : E" from several threads at once, a piece at a time (`std::cout << a << b ...`), so the
# pieces of two messages interleave ("[Gloo] Rank [Gloo] Rank 2 is connected to 33 is ..."). Its
# constant pieces are removed wherever they are; what is left of gloo is digits and blanks.
_GLOO_PIECES = ("[Gloo] Rank ", " is connected to ",
                " peer ranks. Expected number of connected peer ranks is : ")


def own_lines(text: str) -> list[str]:
    """What nnxprune printed: gloo's connection messages (above) and XLA's warnings left out."""
    for piece in _GLOO_PIECES:
        text = text.replace(piece, " ")
    return [line for line in text.splitlines() if line.strip()
            and not line.replace(" ", "").isdigit() and not re.match(r"[WIEF]\d{4} ", line)]
