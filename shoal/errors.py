"""The one exception type for user mistakes.

Anything raised as :class:`UserError` is reported by the CLI as a single line on
stderr with a non-zero exit status, never as a traceback. Bugs stay ordinary
exceptions so that they do show a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (flags, config file, paths, ports)."""
