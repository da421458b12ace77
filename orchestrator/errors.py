"""The exception hierarchy. Only `orchestrator.cli` turns these into a message and an exit code."""

from __future__ import annotations


class GcvmError(Exception):
    """An expected failure: printed as one line plus a hint, never as a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(GcvmError):
    """Bad input from the user (a value out of range, an unknown name). Exit code 2."""

    exit_code = 2


class HostUnsupported(GcvmError):
    """The host cannot do what was asked (no TDX, no SNP, no usable accelerator)."""

    exit_code = 2


class ClusterExists(UsageError):
    pass


class ClusterNotFound(UsageError):
    pass


class ImageMissing(GcvmError):
    pass


class HypervisorError(GcvmError):
    """libvirt refused or failed."""


class RemoteError(GcvmError):
    """SSH to a VM failed, or a command in it exited non-zero."""


class Timeout(GcvmError):
    pass


class Interrupted(GcvmError):
    exit_code = 130
