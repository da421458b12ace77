"""`up`, `down` and `status`: the cluster's life, from keys to ready guests and back to nothing.

Every side effect goes through a `Backend` (libvirt, namespaces, the private daemon, disks, SSH,
the wheel build); unit tests run this same flow against a backend whose libvirt and SSH are fakes.
The order of `up` is chosen so that a refusal costs nothing: the spec, the name, the TEE and the
image are checked before anything is created, and everything created afterwards is recorded (in
the state file and in each domain's gcvm metadata) before it exists, so `down` can find it after
a crash.

One job per module: `backend` (side effects), `parallel`, `guestfacts`, `create` and `ready`
(the two halves of `up`), `boot` (`up` itself, its failure path), `teardown` (`down`), `query`
(`status`, `guest`).
"""

from orchestrator.cluster.backend import Backend, Guest, HostFacts, bridge_name, render_inputs
from orchestrator.cluster.backend import _host as _host
from orchestrator.cluster.boot import DEFAULT_TIMEOUT, up
from orchestrator.cluster.guestfacts import GUEST_FACTS, parse_guest_facts, serial_tail
from orchestrator.cluster.query import ClusterStatus, HostWorkerStatus, VmStatus, guest, status
from orchestrator.cluster.teardown import down
from orchestrator.errors import GcvmError, HypervisorError

__all__ = [
    "DEFAULT_TIMEOUT",
    "GUEST_FACTS",
    "Backend",
    "ClusterStatus",
    "GcvmError",
    "Guest",
    "HostFacts",
    "HostWorkerStatus",
    "HypervisorError",
    "VmStatus",
    "bridge_name",
    "down",
    "guest",
    "parse_guest_facts",
    "render_inputs",
    "serial_tail",
    "status",
    "up",
]
