"""Errors a user can act on.

Anything raised as a `UserError` reaches the command line as one line, `error: <message>`, and a
non-zero exit code, never as a traceback (`exit_code` runs a command's body this way). The message
names the thing that is wrong and the fix.
"""

import sys
from collections.abc import Callable


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


def exit_code(body: Callable[[], object]) -> int:
    """Runs a command's body: 0 when it returns, a UserError's code after one `error:` line on
    stderr, 130 after Ctrl-C."""
    try:
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
