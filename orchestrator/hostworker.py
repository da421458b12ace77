"""The untrusted worker as a process on the host (`gcvm up --worker host`), as the seed deployed it.

`up` starts a small supervisor, `python -m orchestrator.hostworker --dir D`, with the checkout's
venv, inside the cluster's network namespace (so the network rule holds) and in a process group
of its own. It probes the device (CUDA when torch sees one, else the host's CPU threads) in a child
that imports torch, writes `D/info.json`, and then waits. Each `gcvm run` hands it one job: the
framework's own rank, `python -m groupcover launch --role worker --ifname <bridge> ...`, which
binds only to the bridge's host-side address. Its output goes to the cluster's log
(`logs/worker-host.log`, `gcvm logs worker-host`); `down` stops the group (SIGTERM, then SIGKILL).

The job protocol is files in D, written atomically by the client (the cluster lock makes `run`s
take turns): `job.json` {id, argv, env} -> the supervisor renames it `job-ID.json`, starts it in
its own group, writes `job-ID.pid`, and `job-ID.rc` when it ends; `job-ID.cancel` asks it to stop
the job. The supervisor imports only the standard library; the framework stays behind its command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

NAME = "worker-host"
MODULE = "orchestrator.hostworker"
INFO = "info.json"
PID_FILE = "supervisor.pid"
POLL_S = 0.1
PROBE_TIMEOUT_S = 180.0
STOP_GRACE_S = 5.0

# What the probe child prints (it imports torch; the orchestrator never does).
PROBE = """
import json, os, platform, torch
cuda = torch.cuda.is_available()
cpu = platform.processor() or "cpu"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
except OSError:
    pass
print(json.dumps({
    "device": "cuda" if cuda else "cpu",
    "device_name": torch.cuda.get_device_name(0) if cuda else cpu,
    "torch": torch.__version__,
    "cpus": os.cpu_count(),
}))
"""


@dataclass(frozen=True)
class HostWorkerState:
    """The host worker as the cluster state records it."""

    name: str  # <cluster>-worker-host
    rank: int  # after every master
    address: str  # the bridge's host-side address: the only one it listens on
    ifname: str  # the bridge (GLOO_SOCKET_IFNAME / TP_SOCKET_IFNAME)
    python: str  # the checkout's venv
    root: str  # the checkout (PYTHONPATH: the framework from this tree)
    threads: int  # torch intra-op threads on the CPU path
    dir: str  # control folder
    log: str
    netns: str | None = None
    pid: int = 0  # the supervisor, leader of its process group
    started: float = 0.0
    device: str = ""  # cuda or cpu (what torch reports in the worker's environment)
    device_name: str = ""
    torch: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostWorkerState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def short(self) -> str:
        return NAME


def venv_python(root: Path) -> str:
    """The checkout's venv (`make setup` makes .venv); else the Python gcvm runs with."""
    candidate = root / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def worker_env(hw: HostWorkerState, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the supervisor and its jobs: the checkout first on the path."""
    bindir = str(Path(hw.python).parent)
    base = {
        "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": hw.root,
        "PYTHONUNBUFFERED": "1",
        "TORCH_CPP_LOG_LEVEL": "ERROR",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    for key in ("CUDA_VISIBLE_DEVICES", "GCVM_HOME", "GCVM_CACHE"):
        if key in os.environ:
            base[key] = os.environ[key]
    return {**base, **(extra or {})}


# ---- the host side of `up` and `down` ------------------------------------------------------


class HostWorkerError(Exception):
    """Raised as a GcvmError by the callers (this module stays importable without them)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_supervisor(pid: int, control_dir: str) -> bool:
    """True when `pid` is this cluster's supervisor (never signal a reused pid)."""
    if pid <= 0:
        return False
    argv = _cmdline(pid)
    return MODULE in argv and control_dir in argv


def start(hw: HostWorkerState, timeout: float = PROBE_TIMEOUT_S) -> HostWorkerState:
    """Start the supervisor and wait for its device probe; returns the state with pid, device."""
    from orchestrator import netns

    control = Path(hw.dir)
    control.mkdir(parents=True, exist_ok=True)
    Path(hw.log).parent.mkdir(parents=True, exist_ok=True)
    (control / INFO).unlink(missing_ok=True)
    argv = netns.exec_argv(hw.netns, [hw.python, "-m", MODULE, "--dir", hw.dir])
    with open(hw.log, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=worker_env(hw),
            cwd=hw.dir,
            start_new_session=True,  # its own process group: `down` stops the whole of it
            close_fds=True,
        )
    (control / PID_FILE).write_text(f"{proc.pid}\n")  # found by `down` even before the state
    started = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _read_json(control / INFO)
        if info is not None:
            return HostWorkerState.from_dict(
                {**hw.to_dict(), "pid": proc.pid, "started": started,
                 **{k: info[k] for k in ("device", "device_name", "torch") if k in info}}
            )  # fmt: skip
        if proc.poll() is not None:
            raise HostWorkerError(
                f"the host worker exited with status {proc.returncode} before it was ready; "
                f"last lines of {hw.log}:\n{log_tail(hw.log)}",
                hint=f"check the checkout's venv ({hw.python}) imports torch",
            )
        time.sleep(POLL_S)
    stop_pid(proc.pid, hw.dir)
    raise HostWorkerError(
        f"the host worker did not report its device within {timeout:.0f} s; last lines of "
        f"{hw.log}:\n{log_tail(hw.log)}",
        hint="the host may be overloaded; retry, or raise --timeout",
    )


def stop_pid(pid: int, control_dir: str, grace: float = STOP_GRACE_S) -> bool:
    """SIGTERM the supervisor's process group, SIGKILL what is left after `grace`. True when
    something was running."""
    if not is_supervisor(pid, control_dir):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.05)
    if _group_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.05)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it when this process started it
    return True


def stop(hw: HostWorkerState | None, control_dir: Path | None = None) -> bool:
    """Stop the host worker named by the state, or by the pid file a crashed `up` left."""
    pids: list[tuple[int, str]] = []
    if hw is not None and hw.pid:
        pids.append((hw.pid, hw.dir))
    folder = Path(hw.dir) if hw is not None else control_dir
    if folder is not None:
        with contextlib.suppress(OSError, ValueError):
            pids.append((int((folder / PID_FILE).read_text().strip()), str(folder)))
    stopped = any([stop_pid(pid, d) for pid, d in dict(pids).items()])
    if folder is not None:  # a job whose supervisor was killed outright: its own group
        for job in live_jobs(folder):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job, signal.SIGKILL)
            stopped = True
    return stopped


def live_jobs(folder: Path) -> list[int]:
    """Jobs (each the leader of its own group) that never recorded their end and still run the
    command they were started with: after a kill of the supervisor, orphans."""
    found = []
    for pid_file in folder.glob("job-*.pid"):
        job = pid_file.name.removeprefix("job-").removesuffix(".pid")
        if (folder / f"job-{job}.rc").exists():
            continue
        spec = _read_json(folder / f"job-{job}.json") or {}
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            argv = [str(a) for a in spec.get("argv", [])]
            if argv and _cmdline(pid)[: len(argv)] == argv and os.getpgid(pid) == pid:
                found.append(pid)
    return found


def group_stats(pgid: int, proc: Path = Path("/proc")) -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command) of every live (not zombie)
    process in the process group `pgid`; `gcvm top` reads its CPU and memory from them."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat.rpartition(")")[2].split()  # state ppid pgrp session ...
        if len(rest) > 3 and rest[0] != "Z" and int(rest[2]) == pgid:
            yield int(entry.name), rest


def group_pids(pgid: int) -> list[int]:
    """Every process in the process group `pgid` (the supervisor, its job, their children)."""
    return sorted(pid for pid, _ in group_stats(pgid))


def _group_alive(pgid: int) -> bool:
    return bool(group_pids(pgid))


def alive(hw: HostWorkerState) -> bool:
    return is_supervisor(hw.pid, hw.dir)


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()
    except OSError:
        return "(no log)"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)


# ---- the client side of `gcvm run` -----------------------------------------------------------


class Job:
    """One job on the host worker, shaped like a remote rank (poll, kill, tail)."""

    def __init__(self, hw: HostWorkerState, argv: list[str], env: dict[str, str] | None,
                 on_line: Callable[[str], None] | None = None) -> None:  # fmt: skip
        if not alive(hw):
            raise HostWorkerError(
                f"the host worker (pid {hw.pid}) is not running",
                hint="its log (`gcvm logs worker-host`) says why; `gcvm down` and `gcvm up` "
                "start a new one",
            )
        self.hw = hw
        self.id = uuid.uuid4().hex[:12]
        self.control = Path(hw.dir)
        self._tail: deque[str] = deque(maxlen=200)
        self._on_line = on_line
        self._offset = Path(hw.log).stat().st_size if Path(hw.log).exists() else 0
        self._rc: int | None = None
        self._stop = threading.Event()
        _write_json(self.control / "job.json", {"id": self.id, "argv": argv, "env": env or {}})
        self._reader = threading.Thread(target=self._follow, name=f"hostworker-{self.id}",
                                        daemon=True)  # fmt: skip
        self._reader.start()

    def _path(self, suffix: str) -> Path:
        return self.control / f"job-{self.id}.{suffix}"

    def _follow(self) -> None:
        """Print the log's new lines as they come (the job's output lands there)."""
        partial = ""
        while True:
            done = self._stop.is_set()
            try:
                with open(self.hw.log, "rb") as f:
                    f.seek(self._offset)
                    chunk = f.read()
            except OSError:
                chunk = b""
            self._offset += len(chunk)
            text = partial + chunk.decode(errors="replace")
            *lines, partial = text.split("\n")
            for line in lines:
                self._tail.append(line)
                if self._on_line is not None:
                    self._on_line(line)
            if done:
                if partial and self._on_line is not None:
                    self._on_line(partial)
                return
            time.sleep(0.2)

    def poll(self) -> int | None:
        if self._rc is not None:
            return self._rc
        rc_file = self._path("rc")
        if rc_file.exists():
            with contextlib.suppress(ValueError, OSError):
                self._rc = int(rc_file.read_text().strip())
        elif not alive(self.hw):
            self._rc = 255  # the supervisor is gone, and its job with it
            self._tail.append(f"the host worker's supervisor (pid {self.hw.pid}) is gone")
        if self._rc is not None:
            self._stop.set()
            self._reader.join(2)
        return self._rc

    def kill(self) -> None:
        if self.poll() is not None:
            return
        self._path("cancel").write_text("cancel\n")
        deadline = time.monotonic() + STOP_GRACE_S * 2 + 2
        while time.monotonic() < deadline and self.poll() is None:
            time.sleep(POLL_S)
        self._stop.set()

    def tail(self, n: int = 20) -> list[str]:
        return list(self._tail)[-n:]


# ---- the supervisor (runs as `python -m orchestrator.hostworker --dir D`) --------------------


class _Supervisor:
    def __init__(self, control: Path) -> None:
        self.control = control
        self.child: subprocess.Popen[bytes] | None = None
        self.job_id = ""
        self.stopping = False

    def say(self, text: str) -> None:
        print(f"gcvm worker-host: {text}", flush=True)

    def probe(self) -> None:
        proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)  # fmt: skip
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"gcvm worker-host: the device probe failed ({proc.returncode})")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        info["pid"] = os.getpid()
        _write_json(self.control / INFO, info)
        self.say(f"ready: {info['device']} ({info['device_name']}), torch {info['torch']}, "
                 f"{info['cpus']} CPUs; waiting for a job")  # fmt: skip

    def terminate_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(STOP_GRACE_S)

    def start_job(self, job: dict[str, Any]) -> None:
        self.job_id = str(job["id"])
        argv = [str(a) for a in job["argv"]]
        env = {**os.environ, **{str(k): str(v) for k, v in dict(job.get("env", {})).items()}}
        self.say(f"job {self.job_id}: {' '.join(argv)}")
        try:
            # its own group (inside the supervisor's session) so a cancel stops only the job
            self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sys.stdout,
                                          stderr=subprocess.STDOUT, env=env,
                                          process_group=0)  # fmt: skip
        except OSError as exc:
            self.say(f"job {self.job_id}: cannot start: {exc}")
            self._path("rc").write_text("127\n")
            self.child, self.job_id = None, ""
            return
        self._path("pid").write_text(f"{self.child.pid}\n")

    def _path(self, suffix: str) -> Path:
        return self.control / f"job-{self.job_id}.{suffix}"

    def step(self) -> None:
        child = self.child
        if child is not None:
            if self._path("cancel").exists():
                self.say(f"job {self.job_id}: cancelled")
                self.terminate_child()
            rc = child.poll()
            if rc is not None:
                self.say(f"job {self.job_id}: exited with status {rc}")
                tmp = self._path("rc.tmp")
                tmp.write_text(f"{rc}\n")
                os.replace(tmp, self._path("rc"))
                self.child, self.job_id = None, ""
            return
        job_file = self.control / "job.json"
        job = _read_json(job_file)
        if job is None:
            return
        os.replace(job_file, self.control / f"job-{job['id']}.json")
        self.start_job(job)

    def run(self) -> int:
        def on_term(signum: int, frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        self.probe()
        try:
            while not self.stopping:
                self.step()
                time.sleep(POLL_S)
        finally:
            self.terminate_child()
            self.say("stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--dir", type=Path, required=True, help="the control folder")
    args = parser.parse_args(argv)
    return _Supervisor(args.dir).run()


if __name__ == "__main__":
    sys.exit(main())
