"""A Ctrl-C during `up`'s cleanup is noted, never raised; its notice must not re-enter the log.

The signal's handler runs wherever the main thread is, also inside the debug log's flush
(a write interrupted by the signal). Logging from the handler then re-enters that buffered
writer: Python raises "reentrant call" inside logging, which prints a traceback on stderr
(seen in the fault-injection test of a second Ctrl-C).
"""

from __future__ import annotations

import io
import logging
import signal
from collections.abc import Callable

import pytest

from orchestrator import ui
from orchestrator.cluster import boot


class _InterruptedRaw(io.RawIOBase):
    """A file whose first write is interrupted by a signal: the handler runs inside it."""

    def __init__(self, handler: Callable[[], None]) -> None:
        self.handler: Callable[[], None] | None = handler
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        handler, self.handler = self.handler, None
        if handler is not None:
            handler()
        view = memoryview(b).cast("B")  # type: ignore[arg-type]
        self.data += view
        return len(view)


def test_ctrl_c_inside_the_log_flush_is_noted_without_a_traceback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with boot._shielded() as arrived:
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler)
        raw = _InterruptedRaw(lambda: handler(signal.SIGINT, None))
        log_file = logging.StreamHandler(io.TextIOWrapper(io.BufferedWriter(raw), "utf-8"))
        ui.log.addHandler(log_file)
        previous = ui.log.level
        ui.log.setLevel(logging.DEBUG)
        try:
            ui.log.info("step start: clean up the failed cluster t")
        finally:
            ui.log.removeHandler(log_file)
            ui.log.setLevel(previous)
    err = capfd.readouterr().err
    assert arrived == [signal.SIGINT]
    assert "cleaning up; wait for it to finish" in err
    assert "Traceback" not in err and "Logging error" not in err
    assert b"step start" in raw.data
