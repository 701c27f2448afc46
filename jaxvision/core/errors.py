"""Errors a user can act on.

Anything raised as a `UserError` reaches the command line as one line, `error: <message>`, and a
non-zero exit code, never as a traceback (`exit_code` runs a command's body this way). The message
names the thing that is wrong and the fix.
"""

import contextlib
import re
import sys
from collections.abc import Callable, Iterator


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
        return f"could not allocate {int(m[1]) / 2**30:.2f} GiB"
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


def exit_code(body: Callable[[], object], out_of_memory_fix: str = GENERIC_FIX) -> int:
    """Runs a command's body: 0 when it returns, a UserError's code after one `error:` line on
    stderr (out of memory included: `out_of_memory_fix` says what to lower), 130 after Ctrl-C."""
    try:
        with out_of_memory(out_of_memory_fix):
            body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


class Interrupted(UserError):
    """Ctrl-C stopped training; the message says what was saved."""

    exit_code = 130
