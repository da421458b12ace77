"""Running one step for every VM at once, in threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

R = TypeVar("R")
T = TypeVar("T")


def _parallel(fn: Callable[[T], R], items: Sequence[T], what: str) -> list[R]:
    """fn over items in daemon threads; the first failure is raised as soon as it happens
    (an interrupted `up` does not wait for the other threads: its teardown ends them)."""
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

    for i, item in enumerate(items):
        threading.Thread(target=body, args=(i, item), daemon=True, name=f"{what}-{i}").start()
    for _ in items:
        while not done.acquire(timeout=0.2):
            pass
        if errors:
            raise errors[0]
    return [results[i] for i in range(len(items))]
