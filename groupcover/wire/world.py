"""One rank's life in a world over the TCP wire: join through the rendezvous store, serve or
offload, record that it is done, and (rank 0, workers) wait for the others.

Rank 0 hosts the store on MASTER_ADDR:MASTER_PORT, bound to that address only. Every rank records
its role; a worker first starts its server on the address of its interface (TP_SOCKET_IFNAME /
GLOO_SOCKET_IFNAME / --ifname; without one, the address it reaches the store from) and announces
it. Joining returns once every rank of the world has recorded its role, or fails within the
deadline. A worker serves until every master is done (or gone); rank 0 keeps the store until every
rank is done (or gone). A rank is gone when its store connection closes, or stays silent past the
deadline, before it recorded that it is done: the others then exit with `WorkerUnavailable`.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from groupcover.errors import RendezvousError, UsageError, WorkerUnavailable
from groupcover.rendezvous import PEER_GONE, PEER_HINT, Rendezvous, rank_name
from groupcover.wire.client import TcpTransport
from groupcover.wire.netif import interface_address
from groupcover.wire.server import Limits, WorkerServer
from groupcover.wire.store import StoreClient, StoreError, StoreServer
from groupcover.worker import WorkerState


def _assembly_error(rdv: Rendezvous, detail: str = "") -> WorkerUnavailable:
    return WorkerUnavailable(
        f"the world at tcp://{rdv.master_addr}:{rdv.master_port} did not assemble within "
        f"{rdv.timeout_s:g} s (rank {rdv.rank} of {rdv.world_size}{detail})",
        hint=f"start all {rdv.world_size} ranks within --timeout of each other, and check that "
        "every rank reaches the rendezvous address and port",
    )


def _store_lost(rdv: Rendezvous) -> WorkerUnavailable:
    return WorkerUnavailable(
        f"{PEER_GONE} (rank 0, which holds the rendezvous at {rdv.master_addr}:"
        f"{rdv.master_port}, is gone)",
        hint=PEER_HINT,
    )


@dataclass
class Membership:
    rendezvous: Rendezvous
    role: str
    client: StoreClient
    roles: dict[int, str]
    store: StoreServer | None = None
    server: WorkerServer | None = None
    gone: dict[int, str] = field(default_factory=dict)

    def role_of(self, rank: int) -> str:
        return self.roles[rank]

    def address_of(self, rank: int) -> tuple[str, int]:
        try:
            value = self.client.get(f"addr/{rank}")
        except StoreError:
            raise _store_lost(self.rendezvous) from None
        if value is None:
            raise UsageError(f"rank {rank} announced no address (is it a worker?)")
        host, _, port = value.rpartition(":")
        try:  # an IP literal only: never a name to resolve
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise RendezvousError(f"rank {rank} announced {value!r}, not an IP address") from None
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise RendezvousError(f"rank {rank} announced {value!r}, not a TCP port")
        return str(address), int(port)

    def connect(self, rank: int, owner: str, timeout_s: float) -> TcpTransport:
        return TcpTransport(self.address_of(rank), rank_name(rank), owner, timeout_s)

    def _wait_done(self, ranks: list[int], timeout_s: float = math.inf) -> None:
        """Until each rank is done or gone (liveness is the store's to judge), or, with a
        timeout, until it passes: a rank still not done then counts as gone."""
        deadline = time.monotonic() + timeout_s
        for rank in ranks:
            try:
                found = self.client.wait_any([f"done/{rank}", f"gone/{rank}"],
                                             max(0.0, deadline - time.monotonic()))  # fmt: skip
            except StoreError:
                raise _store_lost(self.rendezvous) from None
            if found is None:
                self.gone[rank] = f"not done {timeout_s:g} s after every master was"
                continue
            key, value = found
            if key.startswith("gone/"):
                self.gone[rank] = value

    def finish(self, ok: bool = True) -> None:
        """Records this rank's end and waits as its role requires; `WorkerUnavailable` if a
        peer went away before it was done."""
        rdv = self.rendezvous
        others = [r for r in range(rdv.world_size) if r != rdv.rank]
        try:
            if self.role == "worker":
                self._wait_done([r for r in others if self.roles[r] == "master"])
            try:
                self.client.set(f"done/{rdv.rank}", "ok" if ok else "failed")
            except StoreError:
                raise _store_lost(rdv) from None
            if self.store is not None:
                masters = [r for r in others if self.roles[r] == "master"]
                self._wait_done(masters)  # a master may work for long
                # a worker is done as soon as every master is: one that is not by the deadline
                # (alive, pinging, but silent) must not keep rank 0 from exiting
                self._wait_done([r for r in others if r not in masters], rdv.timeout_s)
        finally:
            self.close()
        if self.gone:
            rank, reason = next(iter(self.gone.items()))
            raise WorkerUnavailable(f"{PEER_GONE} (rank {rank}: {reason})", hint=PEER_HINT)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.client.close()
        if self.store is not None:
            self.store.linger(min(self.rendezvous.timeout_s, 5.0))  # let the others read replies
            self.store.close()


def join(rdv: Rendezvous, role: str, server: Callable[[str], WorkerServer] | None = None,
         ) -> Membership:  # fmt: skip
    """Joins the world; `server(host)` starts a worker's server on the announced host."""
    deadline = time.monotonic() + rdv.timeout_s
    store = None
    if rdv.rank == 0:
        try:
            store = StoreServer(rdv.master_addr, rdv.master_port, rdv.world_size, rdv.timeout_s)
        except OSError as exc:
            raise WorkerUnavailable(
                f"cannot hold the rendezvous on {rdv.master_addr}:{rdv.master_port}: "
                f"{exc.strerror or exc}",
                hint="MASTER_ADDR must be an address of rank 0's host, MASTER_PORT a free port",
            ) from None
    try:
        client = StoreClient.connect(rdv.master_addr, rdv.master_port, deadline, rdv.timeout_s)
    except StoreError:
        if store is not None:
            store.close()
        raise _assembly_error(rdv, ": no rendezvous store answered") from None
    membership = Membership(rdv, role, client, {}, store)
    client.until = deadline + client.interval_s  # the last WAIT's answer may come just after
    try:
        client.join(rdv.rank)
        if role == "worker":
            assert server is not None
            host = interface_address(rdv.ifname) if rdv.ifname else client.local_address
            membership.server = server(host)
            address, port = membership.server.address
            shown = f"[{address}]" if ":" in address else address
            client.set(f"addr/{rdv.rank}", f"{shown}:{port}")
        client.set(f"role/{rdv.rank}", role)
        for rank in range(rdv.world_size):
            found = client.wait_any([f"role/{rank}"], max(0.0, deadline - time.monotonic()))
            if found is None:
                raise _assembly_error(rdv, f"; rank {rank} never joined")
            membership.roles[rank] = found[1]
        client.until = None
    except StoreError as exc:
        membership.close()
        raise _assembly_error(rdv, f": {exc}") from None
    except BaseException:
        membership.close()
        raise
    return membership


def serve(rdv: Rendezvous, state: WorkerState | None = None, limits: Limits | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """A worker's whole life: listen, join, serve until every master is done, leave."""
    shared = state if state is not None else WorkerState()
    chosen = limits or Limits(timeout_s=rdv.timeout_s)

    def start(host: str) -> WorkerServer:
        return WorkerServer(host, 0, shared, chosen, rank_name(rdv.rank)).start()

    membership = join(rdv, "worker", start)
    if on_ready is not None and membership.server is not None:
        host, port = membership.server.address
        on_ready(f"serving on {host}:{port} ({shared.device})")
    membership.finish(ok=True)  # serves (in its threads) until every master is done
