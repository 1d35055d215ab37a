"""The one exception type for user mistakes.

Anything raised as :class:`UserError` is reported by the CLI as a single line on
stderr with a non-zero exit status, never as a traceback. Bugs stay ordinary
exceptions so that they do show a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (flags, config file, paths, ports)."""


USER_ERROR_FILE = ".shoal-user-error"
"""Left in the run directory by a worker that stopped on a :class:`UserError`: the
processes torchrun's agent restarts after it exit at once, and the launcher ends
with the worker's line alone (a mistake is not retried)."""
