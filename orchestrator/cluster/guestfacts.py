"""What a guest says about itself (TEE evidence, its NIC), and its serial console's tail."""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec import Tee

# Read inside each guest once it is up: TEE evidence, then the links (for the NIC's name).
GUEST_FACTS = (
    "dmesg 2>/dev/null | grep -i 'Memory Encryption Features active' | tail -n 1"
    " | sed 's/^/dmesg: /'; "
    'for d in /dev/tdx_guest /dev/sev-guest; do [ -e "$d" ] && echo "device: $d"; done; '
    "ip -o link | sed 's/^/link: /'"
)


def serial_tail(path: Path | str, lines: int = 25) -> str:
    path = Path(path)
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no serial log at {path})"
    tail = [line for line in text if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in tail) or f"(the serial log {path} is empty)"


def agent_facts(health: dict[str, object], mac: str) -> tuple[str, str, str]:
    """(ifname, tee_verified, evidence) from a locked master's agent (`GET /health`), in the
    words GUEST_FACTS' output has."""
    links = health.get("links") or {}
    devices = health.get("tee_devices")
    lines = (
        [f"device: {d}" for d in devices if isinstance(d, str)] if isinstance(devices, list) else []
    )
    if isinstance(links, dict):
        lines += [f"link: 0: {name}: link/ether {addr}" for name, addr in links.items()]
    return parse_guest_facts("\n".join(lines), mac)


def parse_guest_facts(output: str, mac: str) -> tuple[str, str, str]:
    """(ifname, tee_verified, evidence) from GUEST_FACTS' output."""
    ifname = ""
    dmesg = ""
    devices: list[str] = []
    for line in output.splitlines():
        kind, _, rest = line.partition(": ")
        if kind == "dmesg":
            dmesg = rest.strip()
        elif kind == "device":
            devices.append(rest.strip())
        elif kind == "link" and f"link/ether {mac.lower()}" in rest.lower():
            # "2: enp1s0: <BROADCAST,...> mtu 1500 ... link/ether 52:54:00:..."
            ifname = rest.split(":", 2)[1].strip().split("@")[0]
    if "tdx" in dmesg.lower() or "/dev/tdx_guest" in devices:
        tee = Tee.tdx
    elif "sev-snp" in dmesg.lower() or "/dev/sev-guest" in devices:
        tee = Tee.sev_snp
    else:
        tee = Tee.none
    evidence = (
        "; ".join(filter(None, [dmesg, *devices]))
        or "no memory-encryption line in dmesg, no /dev/tdx_guest, no /dev/sev-guest"
    )
    return ifname, str(tee), evidence
