"""Errors a user can act on.

Anything raised as a `UserError` reaches the command line as one line, `error: <message>`, and a
non-zero exit code, never as a traceback (`exit_code` runs a command's body this way). The message
names the thing that is wrong and the fix.
"""

import contextlib
import errno
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


class UserError(Exception):
    """Bad input or a bad request: an unknown arch, a corrupt file, a missing weight file."""

    exit_code = 2


class DataError(UserError):
    """A dataset that cannot be found, read or trusted."""


class DamagedCheckpoint(UserError):
    """A checkpoint whose files do not match its manifest, or that holds non-finite numbers."""


class ConversionError(UserError):
    """A state_dict that does not map key for key, shape for shape, onto the target model."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""

    exit_code = 1


class RunFailed(UserError):
    """A measurement or a run that a script launched did not finish; its own message came first."""

    exit_code = 1


class OutOfMemory(UserError):
    """A framework could not allocate host or device memory; the fix is a smaller request."""

    exit_code = 1


_BYTES = re.compile(r"allocat\w* (\d+) bytes")  # XLA (CPU and GPU), torch's CPU allocator
_SIZE = re.compile(r"allocate (\d+(?:\.\d*)?) ([KMGTPE]i?B)")  # numpy ("256. TiB"), torch CUDA


def failed_allocation(e: BaseException) -> str | None:
    """'could not allocate 28.03 GiB' when `e` is numpy's, XLA's or torch's out-of-memory error;
    None for any other exception. Told apart by type and message, so that this framework-free
    layer imports neither framework."""
    text = str(e)
    if isinstance(e, RuntimeError):
        low = text.lower()
        xla = "RESOURCE_EXHAUSTED" in text and "memory" in low
        torch = "out of memory" in low or "DefaultCPUAllocator" in text  # CUDA / MPS; the CPU
        if not (xla or torch):
            return None
    elif not isinstance(e, MemoryError):
        return None
    if m := _BYTES.search(text):
        n = int(m[1])
        size = f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
        return f"could not allocate {size}"
    if m := _SIZE.search(text):
        return f"could not allocate {float(m[1]):.2f} {m[2]}"
    return "could not allocate memory"


@contextlib.contextmanager
def out_of_memory(fix: str) -> Iterator[None]:
    """Turns an out-of-memory error inside the block into one `OutOfMemory` line that ends in
    `fix` (what to ask for less of)."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        what = failed_allocation(e)
        if what is None:
            raise
        raise OutOfMemory(f"out of memory: {what}; {fix}") from e


GENERIC_FIX = "free memory, or ask for less (fewer or smaller images at a time)"


class WriteFailed(UserError):
    """A file could not be written because the disk is full: no space, a quota, a size limit."""

    exit_code = 1


_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\][\s.]*")  # torch's C++ check prefix
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # tensorstore's (orbax's) I/O errors


# What a write fails with when the disk fills up: no space, a quota, a file-size limit. Other
# OSErrors (a missing folder, a bug's EINVAL) keep their traceback: `train.py` probes its output
# folders up front, so those are not a full disk's doing. A path this user may not access is one
# line (`exit_code`).
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def failed_write(e: BaseException) -> str | None:
    """Why a write failed, in the operating system's words, when `e` is a full disk's error: an
    OSError, or tensorstore's (orbax's) wrapped errno, of `DISK_FULL`, or torch.save's zip writer
    failing (it keeps no errno); None for any other exception."""
    text = str(e)
    if isinstance(e, OSError):
        return e.strerror if e.errno in DISK_FULL else None
    if isinstance(e, RuntimeError | ValueError) and (m := _OS_ERROR_CODE.search(text)):
        return os.strerror(int(m[1])) if int(m[1]) in DISK_FULL else None
    torch_writer = "PytorchStreamWriter" in text or "inline_container" in text
    if isinstance(e, RuntimeError) and torch_writer:  # "[enforce fail at ...] . unexpected pos"
        said = _ENFORCE.sub("", text.strip().splitlines()[0])[:160]
        return f"torch.save's writer failed: {said}"
    return None


DISK_FIX = "free disk space, or choose another --out"


@contextlib.contextmanager
def writing(
    path: Path,
    fix: str | Callable[[], str] = DISK_FIX,
    discard: Callable[[], object] | None = None,
) -> Iterator[None]:
    """Turns a full disk's failed write of `path` inside the block into one `WriteFailed` line
    naming it, why, and `fix` (a string, or a function that makes it once the write has failed).
    What was partly written is removed first: `discard()`, or `path` itself when it is a file
    (one the write had opened and truncated: a full disk's errors come from writing, not from
    opening)."""
    try:
        yield
    except (OSError, RuntimeError, ValueError) as e:
        why = failed_write(e)
        if why is None:
            raise
        with contextlib.suppress(OSError):
            if discard is not None:
                discard()
            elif path.is_file():
                path.unlink()
        if not isinstance(fix, str):
            try:
                fix = fix()
            except Exception:  # noqa: BLE001  (the fix's wording must not hide the failure)
                fix = "free disk space and run again"
        raise WriteFailed(f"cannot write {path} ({why}); {fix}") from e


def denied(e: PermissionError) -> str:
    """A PermissionError of a path as one line that names it and the fix."""
    return (f"permission denied: this user may not access {e.filename}; give it access (chmod), "
            "or pass another path")  # fmt: skip


def exit_code(body: Callable[[], object], out_of_memory_fix: str = GENERIC_FIX) -> int:
    """Runs a command's body: 0 when it returns, a UserError's code after one `error:` line on
    stderr (out of memory included: `out_of_memory_fix` says what to lower), 2 after one line for
    a file or folder this user may not access, 1 after one for a full disk's OSError that no caller
    named, 130 after a Ctrl-C that nothing caught.

    A path that is not valid UTF-8 (a file name from another system) prints with its odd bytes
    escaped, `caf\\udce9.png`, as stderr already does, instead of failing the command: stdout
    is set to the same `backslashreplace`."""
    with contextlib.suppress(AttributeError, ValueError):  # a test's capture, a closed stream
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        with out_of_memory(out_of_memory_fix):
            body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except PermissionError as e:  # a file or folder this user may not access
        if e.filename is None:  # a process, a signal, an affinity: not the user's path
            raise
        print(f"error: {denied(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk that no caller named the file of
        if e.errno not in DISK_FULL:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror}; free disk space and run again",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:  # outside training, which says what it saved (`Interrupted`)
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


class Interrupted(UserError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) stopped training; the message says what was
    saved."""

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum
