"""argparse types that check a value as it is parsed, so a bad number or output path ends a
command at once, before any work, with one line naming the flag (exit 2), never a traceback or a
failure after the run. Every verb of `python -m groupcover` uses them, and `groupcover.settings`
for the workload flags (`Setting.bounds`).

Each type knows its flag, so its message reads "--batch 0 is out of range (1..1024)"; the
framework's parser drops argparse's own "argument --batch: " in front of it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path


def int_in(flag: str, lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in lo..hi (no upper bound where hi is None)."""

    def parse(text: str) -> int:
        value = int(text)  # ValueError: argparse says "invalid int value"
        if value < lo or (hi is not None and value > hi):
            span = f"at least {lo}" if hi is None else f"{lo}..{hi}"
            raise argparse.ArgumentTypeError(f"{flag} {value} is out of range ({span})")
        return value

    parse.__name__ = "int"
    return parse


def positive_int(flag: str) -> Callable[[str], int]:
    return int_in(flag, 1)


def non_negative_int(flag: str) -> Callable[[str], int]:
    return int_in(flag, 0)


def positive_float(flag: str) -> Callable[[str], float]:
    """A finite number above 0 (seconds, say): not 0, negative, nan or inf."""

    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{flag} {text} is not a finite positive number")
        return value

    parse.__name__ = "float"
    return parse


def _writable_folder(flag: str, path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{flag} {path}: there is no folder {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{flag} {path}: the folder {parent} is not writable")


def output_file(flag: str) -> Callable[[str], Path]:
    """A file this run will write: not a folder, and in a folder that exists and is writable
    (checked now, so that a run never ends by failing to write its results)."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{flag} {path} is a folder, not a file")
        if path.exists():
            if not os.access(path, os.W_OK):
                raise argparse.ArgumentTypeError(f"{flag} {path} is not writable")
            return path
        _writable_folder(flag, path)
        return path

    parse.__name__ = "path"
    return parse


def output_folder(flag: str) -> Callable[[str], Path]:
    """A folder this run will create: not a file, in a folder that exists and is writable."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{flag} {path} is a file, not a folder")
        if not path.exists():
            _writable_folder(flag, path)
        return path

    parse.__name__ = "path"
    return parse
