"""Running one step for every VM at once, in threads, and stopping them all on a failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from orchestrator import ui
from orchestrator.errors import Interrupted

R = TypeVar("R")
T = TypeVar("T")

# How long a failed step waits for its other threads to notice the cancel and end.
DEFAULT_GRACE_S = 60.0


class Cancelled(Interrupted):
    """Raised inside a step's thread once another thread of the same step has failed."""


def check(cancel: threading.Event | None) -> None:
    """Raise Cancelled when `cancel` is set (steps call it between their blocking calls)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled: another VM's step failed")


def _parallel(
    fn: Callable[[T], R],
    items: Sequence[T],
    what: str,
    *,
    cancel: threading.Event | None = None,
    grace: float = DEFAULT_GRACE_S,
) -> list[R]:
    """fn over items in daemon threads. The first failure (or a Ctrl-C of the caller) sets
    `cancel` and waits up to `grace` seconds for every other thread to end before it is
    raised, so that teardown never races a thread still creating something."""
    cancel = cancel if cancel is not None else threading.Event()
    results: dict[int, R] = {}
    errors: list[BaseException] = []
    done = threading.Semaphore(0)

    def body(i: int, item: T) -> None:
        try:
            results[i] = fn(item)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.release()

    threads = [
        threading.Thread(target=body, args=(i, item), daemon=True, name=f"{what}-{i}")
        for i, item in enumerate(items)
    ]
    for thread in threads:
        thread.start()
    try:
        for _ in items:
            while not done.acquire(timeout=0.2):
                pass
            if errors:
                raise errors[0]
    except BaseException:
        cancel.set()
        _join(threads, grace, what)
        raise
    return [results[i] for i in range(len(items))]


def _join(threads: list[threading.Thread], grace: float, what: str) -> None:
    """Wait for the threads to end; a second Ctrl-C does not cut the wait short."""
    deadline = time.monotonic() + grace
    for thread in threads:
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                thread.join(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            except KeyboardInterrupt:
                ui.warn(f"waiting for the other {what} threads to stop before cleaning up")
    left = [t.name for t in threads if t.is_alive()]
    if left:
        ui.log.warning("%s: still running after %.0f s: %s", what, grace, ", ".join(left))
