"""A run's key broker: the owner's KBS broker for one `gcvm run bench|seed` (`RunBroker`: the
protocol core of orchestrator.attest and its HTTP(S) server in this process, its listening socket
made inside the cluster's network namespace and bound to the bridge's host-side address only;
it serves this run's keys and stops with the run), or the run's use of the cluster's own broker
(`ClusterBrokerUse`, `gcvm up --broker`). Either serves with the owner folder's broker identity,
the one the cluster's guests pin in their kernel command line (`orchestrator.ownerid`).
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.packages import PackageError, bridge_address
from orchestrator.ui import log


def check_policy(tee: str, policy: Path | None) -> None:
    if tee != "none" and policy is None:
        raise UsageError(f"--tee {tee}: the broker needs a policy file to release keys",
                         hint="pass --policy FILE (accepted measurements / MRTD and RTMRs, "
                         "minimum TCB; see `gcvm broker serve --help`)")  # fmt: skip
    if policy is not None and not policy.is_file():
        raise UsageError(f"--policy {policy}: no such file")


class RunBroker:
    """The owner's KBS broker for one run, in this process: `Broker` + the stdlib HTTP server
    from orchestrator.attest.broker, on a socket made inside the cluster's namespace."""

    def __init__(self, netns_name: str | None, host: str, resources: dict[str, Path], tee: str,
                 policy: Path | None = None, log_file: Path | None = None,
                 port: int = 0, identity: Path | None = None) -> None:  # fmt: skip
        check_policy(tee, policy)  # identity: the broker's folder (HTTPS, signed tokens)
        self.netns, self.host, self.port, self.identity = netns_name, host, port, identity
        self.resources, self.tee, self.policy, self.log_file = resources, tee, policy, log_file
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self._handlers: list[logging.Handler] = []
        self.decisions: list[dict[str, Any]] = []  # the broker's, kept after `stop`
        self._url: str | None = None  # where it listened, kept after `stop` (for the record)

    @property
    def insecure(self) -> bool:
        return self.tee == "none"

    @property
    def url(self) -> str:
        assert self._url is not None, "broker not started"
        return self._url

    def argv(self) -> list[str]:
        """The equivalent `gcvm broker serve` command line (printed, and in the results)."""
        argv = ["gcvm", "broker", "serve", "--listen", f"{self.host}:{self.port}"]
        if self.policy is not None:
            argv += ["--policy", str(self.policy)]
        for name, path in sorted(self.resources.items()):
            argv += ["--resource", f"{name}={path}"]
        if self.insecure:
            argv.append("--insecure-no-attestation")
        if self.log_file is not None:
            argv += ["--log", str(self.log_file)]
        if self.identity is not None:
            argv += ["--identity", str(self.identity)]
        return argv

    def start(self) -> RunBroker:
        from orchestrator import netns
        from orchestrator.attest.broker import _Server
        from orchestrator.attest.identity import load_or_create
        from orchestrator.attest.kbs import Broker
        from orchestrator.attest.policy import Policy, load_policy

        pol = load_policy(self.policy) if self.policy is not None else Policy()
        pol.resources.update(self.resources)
        ident = load_or_create(self.identity) if self.identity is not None else None
        broker = Broker(pol, insecure_no_attestation=self.insecure, identity=ident)
        broker_log = logging.getLogger("gcvm.broker")
        broker_log.setLevel(logging.INFO)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = logging.FileHandler(self.log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s broker %(levelname)s %(message)s"))
            broker_log.addHandler(handler)
            self._handlers.append(handler)
        try:
            sock = netns.listen_tcp(self.netns, self.host, self.port)
        except OSError as exc:
            self._drop_handlers()
            raise PackageError(f"the broker cannot listen on {self.host}:{self.port}: "
                               f"{exc.strerror or exc}") from None  # fmt: skip
        server = _Server((self.host, 0), _handler_class(), bind_and_activate=False,
                         identity=ident)  # fmt: skip
        server.socket.close()
        server.socket = sock
        server.server_address = sock.getsockname()
        server.broker = broker
        self.server = server
        self._url = server.url
        self.thread = threading.Thread(target=server.serve_forever, name="gcvm-run-broker",
                                       kwargs={"poll_interval": 0.2}, daemon=True)  # fmt: skip
        self.thread.start()
        log.debug("broker: %s", shlex.join(self.argv()))
        return self

    def _drop_handlers(self) -> None:
        broker_log = logging.getLogger("gcvm.broker")
        for handler in self._handlers:
            broker_log.removeHandler(handler)
            handler.close()
        self._handlers.clear()

    def stop(self) -> None:
        if self.server is not None:
            self.decisions = list(self.server.broker.decisions)
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.thread is not None:
            self.thread.join(timeout=5)
            self.thread = None
        self._drop_handlers()

    def __enter__(self) -> RunBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ClusterBrokerUse:
    """A run's use of the cluster's own broker (`gcvm up --broker`), with RunBroker's interface:
    `start` installs the run's keys where the broker serves them, `stop` reads back the
    decisions it made during the run."""

    def __init__(self, broker: Any, resources: dict[str, Path], policy: Path | None) -> None:
        if policy is not None:
            raise UsageError(f"--policy {policy}: the cluster's key broker has its own policy",
                             hint="leave out --policy (the broker's is the one `gcvm up "
                             "--broker --policy` gave)")  # fmt: skip
        self.broker, self.resources = broker, resources
        self.decisions: list[dict[str, Any]] = []
        self.since = 0.0

    @property
    def insecure(self) -> bool:
        return bool(self.broker.insecure)

    @property
    def url(self) -> str:
        return str(self.broker.url)

    def argv(self) -> list[str]:
        from orchestrator import clusterbroker

        return clusterbroker.argv(self.broker)

    def start(self) -> ClusterBrokerUse:
        from orchestrator import clusterbroker

        if not clusterbroker.alive(self.broker):
            raise PackageError(f"the cluster's key broker (pid {self.broker.pid}) is not running",
                               hint=f"its output: {self.broker.log.with_suffix('.out')}; "
                               "`gcvm down` and `gcvm up --broker` again")  # fmt: skip
        self.since = time.time() - 1.0
        for name, key in self.resources.items():
            clusterbroker.install_key(self.broker, name, key)
        return self

    def stop(self) -> None:
        from orchestrator import clusterbroker

        self.decisions = clusterbroker.decisions_since(self.broker, self.since)


def broker_for(st: Any, resources: dict[str, Path], tee: str, policy: Path | None,
               log_file: Path, identity: Path | None = None
               ) -> RunBroker | ClusterBrokerUse:  # fmt: skip
    """The cluster's broker when `up --broker` started one, else a broker for this run (with
    the owner's broker identity: the one the cluster's guests pin)."""
    if st.cluster_broker is not None:
        return ClusterBrokerUse(st.cluster_broker, resources, policy)
    return RunBroker(st.netns, bridge_address(st), resources, tee, policy, log_file,
                     identity=identity)  # fmt: skip


def _handler_class() -> Any:
    from orchestrator.attest.broker import _Handler

    return _Handler
