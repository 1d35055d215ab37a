"""The exception types reported as one line, never as a traceback.

Anything raised as :class:`UserError` (a mistake in the job) or
:class:`PeerRejected` (an impostor on the wire) is reported by the CLI and the
workers as a single line on stderr with a non-zero exit status. Bugs stay
ordinary exceptions so that they do show a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (flags, config file, paths, ports)."""


class PeerRejected(Exception):
    """A peer that failed to prove it belongs to the job (it does not know the secret, or
    does not speak shoal's wire): nothing is taken from it. Reported in one line."""


class PeerLost(RuntimeError):
    """A peer stopped answering, or refused a request: said in one line by a worker."""
