"""Refilling the mask pools in the master's idle time: `IdleRefill`, a background thread at the
lowest CPU priority.

A masked mode's forward takes one pair (r, u = op(r, W'')) per layer from the pools; drawing
the next forward's pairs costs the master a full product per layer (`groupcover.masks`). Made
after each forward, that cost adds to every request. Made by this thread instead, it runs while
the master would otherwise be idle: while it waits for the worker (the socket wait releases the
interpreter lock, and torch's products release it too) and between requests. The thread runs at
nice 19 (Linux sets niceness per thread), so on a guest with one vCPU the forward keeps the CPU
whenever it has work and the refill takes what is left; with a spare core it runs beside it.

It draws one pair per step (`MaskPool.refill_one`) and sleeps while every pool is full, so a
`stop` takes effect within one pair's time. What it drew is counted apart
(`stats()["idle_refill"]`); a forward that finds a pool empty still draws online, inside itself
(`online_refill`): the benchmark's `--request-rate` shows how often that happens at a rate.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from groupcover.masks import MaskPool

IDLE_NICE = 19  # the lowest priority
FULL_POLL_S = 0.005  # while every pool is full: look again this often


def lower_this_thread(nice: int = IDLE_NICE) -> bool:
    """This thread (not the process) at `nice`; False where the OS does not allow it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):
        return False
    return True


class IdleRefill:
    """Keeps `pairs` pairs ahead in every pool of `masks` from a low-priority thread."""

    def __init__(self, masks: MaskPool, pairs: int = 1) -> None:
        self.masks = masks
        self.pairs = pairs
        self.lowered = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> IdleRefill:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="mask-refill", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        self.lowered = lower_this_thread()
        try:
            with torch.no_grad():
                while not self._stop.is_set():
                    if not self.masks.refill_one(self.pairs):
                        self._stop.wait(FULL_POLL_S)
        except BaseException as exc:  # reported by stop(): the forwards go on drawing online
            self.error = exc

    def stop(self) -> None:
        """Stops the thread (within one pair's time); raises what it failed with, if it did."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def __enter__(self) -> IdleRefill:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception) if exc[0] is not None else contextlib.nullcontext():
            self.stop()
