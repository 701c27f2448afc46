"""Errors a user can act on.

Anything raised as a `UserError` reaches the command line as one line, `error: <message>`, and a
non-zero exit code, never as a traceback. The message names the thing that is wrong and the fix.
"""


class UserError(Exception):
    """Bad input or a bad request: an unknown arch, a corrupt file, a missing weight file."""

    exit_code = 2


class DataError(UserError):
    """A dataset that cannot be found, read or trusted."""


class ConversionError(UserError):
    """A state_dict that does not map key for key, shape for shape, onto the target model."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""

    exit_code = 1
