"""Progress and logging: nested timed steps on stderr, and an always-on debug log per cluster."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

console = Console(stderr=True, highlight=False)
# results (tables) go to stdout; piped into a file or CI log, they keep their columns
out = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
log = logging.getLogger("gcvm")
log.addHandler(logging.NullHandler())  # no stderr fallback: the CLI prints errors itself
_depth = 0


def attach_debug_log(path: Path) -> None:
    """Append DEBUG records for this command to `path` (one per cluster, kept across commands)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """A timed step: '▶ title' on entry, '✔ title (12.3 s)' or '✘ title (…)' on exit."""
    global _depth
    indent = "  " * _depth
    console.print(f"{indent}[bold]▶[/] {title}")
    log.info("step start: %s", title)
    start = time.monotonic()
    _depth += 1
    try:
        yield
    except BaseException:
        _depth -= 1
        elapsed = time.monotonic() - start
        console.print(f"{indent}[red]✘[/] {title} [dim]({elapsed:.1f} s)[/]")
        log.info("step failed: %s (%.1f s)", title, elapsed)
        raise
    _depth -= 1
    elapsed = time.monotonic() - start
    console.print(f"{indent}[green]✔[/] {title} [dim]({elapsed:.1f} s)[/]")
    log.info("step done: %s (%.1f s)", title, elapsed)


def info(message: str) -> None:
    console.print("  " * _depth + message)
    log.info("%s", message)


def warn(message: str) -> None:
    console.print("  " * _depth + f"[yellow]warning:[/] {message}")
    log.warning("%s", message)
