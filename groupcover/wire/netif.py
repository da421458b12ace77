"""The IPv4 address of a named network interface (SIOCGIFADDR), as the seed's *_SOCKET_IFNAME
variables name it."""

from __future__ import annotations

import fcntl
import socket
import struct

from groupcover.errors import RendezvousError

SIOCGIFADDR = 0x8915
IFNAMSIZ = 16


def interface_address(name: str) -> str:
    """The interface's IPv4 address; `RendezvousError` if it has none or does not exist."""
    data = name.encode()
    if not data or len(data) >= IFNAMSIZ or b"\0" in data or b"/" in data:
        raise RendezvousError(f"{name!r} is not a network interface name")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", data))
        except OSError as exc:
            raise RendezvousError(
                f"interface {name!r} has no IPv4 address ({exc.strerror or exc})",
                hint="TP_SOCKET_IFNAME / GLOO_SOCKET_IFNAME / --ifname must name an interface "
                "with an address on the network the ranks share",
            ) from None
    return socket.inet_ntoa(answer[20:24])
