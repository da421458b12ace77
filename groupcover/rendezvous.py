"""How one rank joins a world: the seed's rendezvous settings, shared by both transports.

The default TCP wire (`groupcover.wire.world`) and the opt-in torch-rpc transport
(`groupcover.rpc`) both take a `Rendezvous`; nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from groupcover.errors import RendezvousError

DEFAULT_TIMEOUT_S = 60.0
PEER_GONE = "a peer rank went away before the whole world had finished"
PEER_HINT = "another rank's process died or its host went away; see its output"
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def rank_name(rank: int) -> str:
    return f"worker{rank}"


@dataclass(frozen=True)
class Rendezvous:
    """How one rank joins the world. `init_method` (e.g. file://) overrides address and port."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    ifname: str | None = None
    force_tcp: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    init_method: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise RendezvousError(
                f"world size must be at least 2 (a master and a worker), not {self.world_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise RendezvousError(f"rank {self.rank} is outside the world (size {self.world_size})")
        if not 0 < self.master_port < 65536:
            raise RendezvousError(f"master port {self.master_port} is not a TCP port")
        if self.timeout_s <= 0:
            raise RendezvousError(f"timeout must be positive, not {self.timeout_s}")

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Rendezvous:
        """The seed's variables: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (+ *_SOCKET_IFNAME)."""
        missing = [name for name in RENDEZVOUS_VARIABLES if not env.get(name)]
        if missing:
            raise RendezvousError(
                f"missing rendezvous variable(s): {', '.join(missing)}",
                hint="set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE",
            )
        values: dict[str, Any] = {
            "master_addr": env["MASTER_ADDR"],
            "master_port": _env_int(env, "MASTER_PORT"),
            "rank": _env_int(env, "RANK"),
            "world_size": _env_int(env, "WORLD_SIZE"),
            "ifname": env.get("TP_SOCKET_IFNAME") or env.get("GLOO_SOCKET_IFNAME") or None,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def url(self) -> str:
        return self.init_method or f"tcp://{self.master_addr}:{self.master_port}"


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise RendezvousError(f"{name}={env[name]!r} is not an integer") from None
