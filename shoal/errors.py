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


class TrainingFailed(RuntimeError):
    """A job that started and did not finish (``shoal.train``): the line ``shoal train``
    would print, and the exception a worker raised where one did
    (:class:`shoal.failure.Failure`, with its traceback)."""

    def __init__(self, line: str, raised: object = None) -> None:
        super().__init__(line)
        self.raised = raised

    def __str__(self) -> str:
        trace = getattr(self.raised, "user_trace", "")
        return f"{self.args[0]}\n{trace}".rstrip() if trace else str(self.args[0])
