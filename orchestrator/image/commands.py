"""Running the build's commands into its log, and removing a build tree safely."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from orchestrator import ui
from orchestrator.errors import GcvmError


def _log_tail(log_path: Path, lines: int = 8) -> str:
    with log_path.open("rb") as handle:
        handle.seek(max(0, log_path.stat().st_size - 8192))
        text = handle.read().decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(
    argv: Sequence[str],
    log_path: Path,
    *,
    timeout: float = 1800,
    stdin: str | None = None,
    capture: bool = False,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` with its output going to the build log as it comes (stdout is kept instead
    when `capture`); raise GcvmError with the log's tail when it fails and `check`."""
    command = subprocess.list2cmdline(list(argv))
    ui.log.debug("run: %s", command)
    with log_path.open("a") as log_file:
        log_file.write(f"$ {command}\n")
        log_file.flush()
        try:
            proc = subprocess.run(
                list(argv),
                input=stdin,
                text=True,
                timeout=timeout,
                check=False,
                stdout=subprocess.PIPE if capture else log_file,
                stderr=log_file,
                cwd=cwd,
            )
        except subprocess.TimeoutExpired:
            raise GcvmError(
                f"{argv[0]} took longer than {timeout:.0f} s", hint=f"see {log_path}"
            ) from None
    if capture:
        with log_path.open("a") as log_file:
            log_file.write(proc.stdout)
    if check and proc.returncode != 0:
        raise GcvmError(
            f"image build failed: {command[:200]} exited with {proc.returncode}\n"
            f"{_log_tail(log_path)}",
            hint=f"the full output is in {log_path}",
        )
    return proc


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    mounts = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix) or point == prefix.rstrip("/"):
                mounts.append(point)
    return mounts


def remove_tree(path: Path) -> None:
    """Delete a build folder, refusing to descend into anything still mounted under it (a
    crashed mmdebstrap may leave /proc, /sys or /dev bind mounts in its tree)."""
    if not path.exists():
        return
    for point in sorted(_mounts_under(path), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    if left := _mounts_under(path):
        raise GcvmError(
            f"cannot delete {path}: {left[0]} is still mounted",
            hint=f"unmount it ('umount -R {left[0]}'), then delete {path}",
        )
    shutil.rmtree(path)
