"""The locked master's agent: an HTTP server (stdlib `http.server`) that takes package files and
one job at a time, and gives back the job's output lines and its results file.

Requests (every one answered with JSON, an error as `{"error": "..."}` and status 400/404/409):

- `GET /health`: what the guest says about itself (kernel, links, TEE devices, whether the
  measured command line locks it, the code's root hash);
- `PUT /packages/ID/FILE`: one file of a model package (FILE one of the package format's names),
  written under the package root; the package's owner signature is checked by the framework
  before any byte of it is used, so the agent only bounds names and sizes;
- `POST /jobs`: `{"argv": [...], "env": {...}}`, checked by `groupcover.agent.jobs`; 409 while
  a job runs;
- `GET /jobs/N?from=K&wait=S`: the job's output lines from K on and its exit status once it
  exited; with `wait`, held up to S seconds until there is something new (a long poll);
- `DELETE /jobs/N`: stop it (its whole process group);
- `GET /results/RUN/NAME.json`: a results file a job wrote (the framework's results carry no
  secret: timings, errors, the key release's facts).

Nothing here runs a shell, takes a path outside its two roots, or changes what the framework
trusts: that comes only from the measured command line (`groupcover.trust`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

from groupcover.agent.jobs import NAME_RE, PACKAGES_ROOT, RESULTS_ROOT, Job, JobRefused, check_job
from groupcover.package.layout import BASELINES, MANIFEST, PUBLISHED, SEALED, SIGNATURE

PORT = 7441
PACKAGE_FILES = frozenset({MANIFEST, PUBLISHED, SEALED, BASELINES, SIGNATURE})
MAX_FILE_BYTES = 8 << 30
MAX_JOB_BYTES = 64 << 10
MAX_LINES = 20_000
CHUNK = 1 << 20
MAX_WAIT_S = 30.0
CMDLINE = Path("/proc/cmdline")


class RunningJob:
    """A job's process, its output lines (the last MAX_LINES) and its exit status."""

    def __init__(self, number: int, job: Job, env: dict[str, str], cwd: Path) -> None:
        self.number = number
        self.lines: deque[str] = deque(maxlen=MAX_LINES)
        self.first = 0  # the number of the oldest line kept
        self.rc: int | None = None  # set once the output is read to its end and the job exited
        self._changed = threading.Condition()  # a new line, or the end
        self.proc = subprocess.Popen(
            # -P: no working folder on sys.path; -s: no user site. The code is PYTHONPATH's
            # (the verified code disk) and the image's venv, nothing else.
            [sys.executable, "-P", "-s", "-m", "groupcover", *job.argv],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                if len(self.lines) == MAX_LINES:
                    self.first += 1
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        rc = self.proc.wait()
        with self._changed:
            self.rc = rc
            self._changed.notify_all()

    def view(self, start: int, wait: float = 0.0) -> dict[str, Any]:
        """Lines from `start` on and the exit status; with `wait`, held until there is a new
        line or the end, at most `wait` seconds (a long poll: on a slow guest CPU, answering
        a poll twice a second costs the job it watches). The status comes only with the end of
        the output: a process's exit can be seen before its last lines are read, and a follower
        that stopped there would lose them."""
        with self._changed:
            self._changed.wait_for(
                lambda: self.first + len(self.lines) > start or self.rc is not None,
                timeout=max(0.0, min(wait, MAX_WAIT_S)),
            )
            start = max(start, self.first)
            lines = list(self.lines)[start - self.first :]
            end = self.first + len(self.lines)
            return {"id": self.number, "rc": self.rc, "lines": lines, "next": end}

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


class Agent:
    """The state behind the server: the two roots and the jobs."""

    def __init__(self, packages_root: Path = Path(PACKAGES_ROOT),
                 results_root: Path = Path(RESULTS_ROOT)) -> None:  # fmt: skip
        self.packages_root = packages_root
        self.results_root = results_root
        self.jobs: dict[int, RunningJob] = {}
        self._lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        words = _cmdline_words()
        code = next((w.split("=", 1)[1] for w in words if w.startswith("gcvm.code=")), None)
        links = {}
        for dev in sorted(Path("/sys/class/net").glob("*")):
            try:
                links[dev.name] = (dev / "address").read_text().strip()
            except OSError:
                continue
        return {
            "agent": "gcvm locked master",
            "locked": "gcvm.locked=1" in words,
            "code_root_hash": code,
            "kernel": os.uname().release,
            "python": sys.version.split()[0],
            "links": links,
            "tee_devices": [d for d in ("/dev/tdx_guest", "/dev/sev-guest") if Path(d).exists()],
            "busy": any(j.proc.poll() is None for j in self.jobs.values()),
        }

    def put_package_file(self, package: str, name: str, length: int, body: Any) -> dict[str, Any]:
        if not NAME_RE.fullmatch(package) or name not in PACKAGE_FILES:
            raise JobRefused(f"a package file is ID/one of {', '.join(sorted(PACKAGE_FILES))}")
        if not 0 < length <= MAX_FILE_BYTES:
            raise JobRefused(f"a package file has 1 to {MAX_FILE_BYTES} bytes")
        folder = self.packages_root / package
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        part = folder / f".{name}.part"
        left = length
        with part.open("wb") as out:
            while left:
                chunk = body.read(min(CHUNK, left))
                if not chunk:
                    part.unlink(missing_ok=True)
                    raise JobRefused(f"{name}: the body ended {left} bytes early")
                out.write(chunk)
                left -= len(chunk)
        part.replace(folder / name)
        return {"package": package, "file": name, "bytes": length}

    def start(self, document: object) -> dict[str, Any]:
        job = check_job(document, PurePosixPath(self.packages_root),
                        PurePosixPath(self.results_root))  # fmt: skip
        with self._lock:
            if any(j.proc.poll() is None for j in self.jobs.values()):
                raise Busy("a job is running; one at a time")
            if job.results is not None:
                Path(job.results).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.results_root.mkdir(parents=True, exist_ok=True, mode=0o700)
            number = len(self.jobs) + 1
            self.jobs[number] = RunningJob(number, job, job_env(job), self.results_root)
        return {"id": number}

    def result(self, run: str, name: str) -> bytes:
        if not NAME_RE.fullmatch(run) or not NAME_RE.fullmatch(name) or not name.endswith(".json"):
            raise JobRefused("a results file is RUN/NAME.json")
        return (self.results_root / run / name).read_bytes()


class Busy(Exception):
    pass


def _cmdline_words() -> list[str]:
    try:
        return CMDLINE.read_text().split()
    except OSError:
        return []


def job_env(job: Job) -> dict[str, str]:
    """A job's environment: the agent's own (the measured image's unit sets it) and the job's
    checked variables."""
    own = {k: os.environ[k] for k in ("PYTHONPATH", "HOME", "LANG") if k in os.environ}
    bindir = str(Path(sys.executable).parent)
    return {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        **own,
        **dict(job.env),
    }


class Handler(BaseHTTPRequestHandler):
    server_version = "gcvm-agent"
    agent: Agent  # set on the subclass `serve` makes

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"gcvm-agent: {self.address_string()} {format % args}\n")

    def _send(self, status: int, document: Any = None, raw: bytes | None = None) -> None:
        body = raw if raw is not None else (json.dumps(document) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None
                         else "application/json")  # fmt: skip
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _length(self) -> int:
        try:
            return int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise JobRefused("Content-Length is required") from None

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        try:
            if method == "GET" and parts == ["health"]:
                return self._send(200, self.agent.health())
            if method == "PUT" and len(parts) == 3 and parts[0] == "packages":
                done = self.agent.put_package_file(parts[1], parts[2], self._length(), self.rfile)
                return self._send(201, done)
            if method == "POST" and parts == ["jobs"]:
                length = self._length()
                if not 0 < length <= MAX_JOB_BYTES:
                    raise JobRefused(f"a job is 1 to {MAX_JOB_BYTES} bytes of JSON")
                try:
                    document = json.loads(self.rfile.read(length))
                except ValueError:
                    raise JobRefused("a job is JSON") from None
                return self._send(201, self.agent.start(document))
            if len(parts) == 2 and parts[0] == "jobs" and re.fullmatch(r"[0-9]{1,6}", parts[1]):
                job = self.agent.jobs.get(int(parts[1]))
                if job is None:
                    return self._send(404, {"error": f"no job {parts[1]}"})
                if method == "GET":
                    query = parse_qs(url.query)
                    start = query.get("from", ["0"])[0]
                    wait = query.get("wait", ["0"])[0]
                    return self._send(
                        200,
                        job.view(
                            int(start) if start.isdigit() else 0,
                            float(wait) if wait.isdigit() else 0.0,
                        ),
                    )
                if method == "DELETE":
                    job.stop()
                    return self._send(200, job.view(0) | {"lines": []})
            if method == "GET" and len(parts) == 3 and parts[0] == "results":
                return self._send(200, raw=self.agent.result(parts[1], parts[2]))
            return self._send(404, {"error": f"no {method} {url.path} on a locked master"})
        except JobRefused as exc:
            return self._send(400, {"error": str(exc)})
        except Busy as exc:
            return self._send(409, {"error": str(exc)})
        except FileNotFoundError as exc:
            return self._send(404, {"error": f"no such file: {Path(exc.filename or '').name}"})

    def do_GET(self) -> None:
        self._route("GET")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")


def make_server(agent: Agent, host: str = "0.0.0.0", port: int = PORT) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"agent": agent})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
