"""`nnxprune export`: one output in one format, settled before loading; written whole or not at all.

The command takes its output as a positional OUT_DIR (format from `--format`, default hf) or as
`--hf OUT_DIR` / `--checkpoint OUT_DIR`. Two outputs (`export M out1 --hf out2`) or a format that
contradicts the flag (`--format checkpoint --hf out`) are refused with one line before any weight
is read: nnxprune writes one output per run and never ignores one it was given.

A write that fails in the operating system (a full disk: ENOSPC; EDQUOT, EFBIG, EIO, ...) is one
line naming the output and the reason, and the temporary folder is removed (`io.atomic.atomic_dir`):
nothing partial is left and an earlier output is untouched. Such failures come as `OSError` from
Python writes (config.json, the tokenizer), but as `SafetensorError` ("I/O error: No space left on
device (os error 28)") from safetensors and as `ValueError` ("... [os_error_code='28'] ...") from
Orbax's tensorstore: all three are recognised by the OS error code.

Example:
    >>> out, fmt = export_target(None, "out/hf", None, None)      # ("out/hf", "hf")
    >>> write_export(load_model("smollm2-135m"), out, fmt)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Iterator

from nnxprune.errors import UserError

FORMATS = ("hf", "checkpoint")
_OS_CODE = re.compile(r"os error (\d+)|os_error_code='(\d+)'")  # Rust's io::Error; tensorstore


def export_target(out, hf, checkpoint, fmt: str | None) -> tuple[str, str]:
    """`(output folder, format)` from the command's arguments: the positional OUT_DIR, `--hf`,
    `--checkpoint` and `--format` (None when not given). UserError unless exactly one output is
    given and the format does not contradict it."""
    given = [(flag, path) for flag, path in (("OUT_DIR", out), ("--hf", hf),
                                             ("--checkpoint", checkpoint)) if path is not None]
    if not given:
        raise UserError("give an output: --hf OUT_DIR or --checkpoint OUT_DIR")
    if len(given) > 1:
        listed = " and ".join(f"{flag} {path}" if flag != "OUT_DIR" else str(path)
                              for flag, path in given)
        raise UserError(f"two outputs given ({listed}); an export writes one: give OUT_DIR "
                        f"(with --format) or --hf OUT_DIR or --checkpoint OUT_DIR")
    flag, path = given[0]
    implied = {"--hf": "hf", "--checkpoint": "checkpoint"}.get(flag)
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if implied is not None and fmt is not None and fmt != implied:
        raise UserError(f"--format {fmt} contradicts {flag} {path}: drop --format, or give "
                        f"{'--hf' if fmt == 'hf' else '--checkpoint'} OUT_DIR")
    return str(path), implied or fmt or "hf"


def write_export(loaded, out, fmt: str, *, overwrite: bool = False) -> Path:
    """Writes `loaded` (an `io.load.LoadedModel`) to `out` as an HF folder or an nnxprune
    checkpoint; an OS error while writing (a full disk) is a UserError, nothing partial left."""
    from nnxprune.io.checkpoint import save_checkpoint
    from nnxprune.io.hf import export_hf
    from nnxprune.io.load import source_label

    existed = os.path.lexists(out)
    with _held_stderr() as held:
        try:
            if fmt == "hf":
                return export_hf(loaded.model, out, tokenizer=loaded.tokenizer, overwrite=overwrite)
            provenance = {"source": loaded.source, "source_model": source_label(loaded)}
            return save_checkpoint(loaded.model, out, tokenizer=loaded.tokenizer,
                                   provenance=provenance, overwrite=overwrite)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - only OS write failures become a UserError
            reason = os_failure(e)
            if reason is None:
                raise
            held.dropped = True  # the one line below says it all
    kept = f"; the existing {out} is unchanged" if existed else ""
    raise UserError(f"cannot write {out}: {reason}; nothing was written{kept}")


class _Held:
    def __init__(self):
        self.text, self.unraisable, self.dropped = io.StringIO(), [], False


@contextlib.contextmanager
def _held_stderr() -> Iterator[_Held]:
    """Holds what is printed on stderr and raised unraisably during the block, and passes it on at
    the end unless `dropped`: when a write fails, Orbax's worker threads log a traceback each
    (absl ERROR records and "Event loop is closed" from tensorstore callbacks, ~300 lines)."""
    held, hook = _Held(), sys.unraisablehook
    sys.unraisablehook = held.unraisable.append
    try:
        with contextlib.redirect_stderr(held.text):
            yield held
    finally:
        sys.unraisablehook = hook
        if not held.dropped:
            sys.stderr.write(held.text.getvalue())
            for args in held.unraisable:
                hook(args)


def os_failure(error: BaseException) -> str | None:
    """`"No space left on device (errno 28)"` for an operating-system write failure (an
    `OSError`, or a library error carrying an OS error code), None for anything else."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        m = _OS_CODE.search(str(error))
        if m is None:
            return _first_line(error) if isinstance(error, OSError) else None
        code = int(m.group(1) or m.group(2))
    return f"{os.strerror(code)} (errno {code})"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
