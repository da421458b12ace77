"""The framework's expected failures; `groupcover.__main__` prints them (message + exit code).

Every class takes `(message, hint=None)`, and a one-argument call works too: torch's RPC layer
re-raises a worker's exception on the master as `type(message)`, so worker-side errors survive the
wire with their class.
"""

from __future__ import annotations

import sys


class GroupCoverError(Exception):
    """An expected failure: printed as one line plus a hint on stderr, never as a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(GroupCoverError):
    """Bad input: an unknown name, a value out of range, an inconsistent rank layout (exit 2)."""

    exit_code = 2


class PackageError(GroupCoverError):
    """A model package (or one of its files) that is missing, malformed or not this run's: one
    line, never a traceback, whatever the host wrote into the files (exit 2)."""

    exit_code = 2


class RendezvousError(UsageError):
    """The rendezvous settings (address, port, rank, world size) are missing or invalid."""


class WorkerUnavailable(GroupCoverError):
    """The worker did not answer within the timeout, or its connection broke."""

    exit_code = 3


class WorkerError(GroupCoverError):
    """The worker answered with an error (for example a layer it never received)."""

    exit_code = 3


class UnknownLayer(WorkerError):
    """A run call named a layer that this master never published to the worker."""


class IntegrityError(WorkerError):
    """A worker's result failed the master's integrity check (a wrong result for a layer)."""


def print_error(exc: GroupCoverError) -> None:
    """The one way an expected failure is shown: one line, plus a hint line when there is one."""
    print(f"groupcover: error: {exc.message}", file=sys.stderr, flush=True)
    if exc.hint:
        print(f"groupcover: hint: {exc.hint}", file=sys.stderr, flush=True)


class WorkerProtocolError(WorkerError):
    """The worker's message broke the wire schema or did not match what the master expected."""


class WorkerLost(WorkerError, WorkerUnavailable):
    """The worker closed the connection early, reset it, or stalled past the deadline."""
