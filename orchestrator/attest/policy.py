"""The broker's policy file (YAML or JSON): what evidence releases which resource.

```yaml
nonce_ttl_s: 60            # a challenge's lifetime; nonces are single-use
token_ttl_s: 300           # the attestation token's (and the attested session's) lifetime
snp:
  measurements: [<96 hex>]   # accepted launch digests (sev-snp-measure); empty: refuse all
  min_tcb: {bootloader: 3, tee: 0, snp: 8, microcode: 115}
  vmpl: [0]                  # accepted VMPLs
  guest_policy:              # the launch's SNP guest policy bits (absent: not checked)
    smt: true                # bit 16 SMT allowed, must equal this
    migrate_ma: false        # bit 18 migration agent allowed, must equal this
    single_socket: false     # bit 20 single socket only, must equal this
    abi_min: "0.0"           # bits 15..0 (major.minor): at least this
  certs: certs/              # VCEK/VLEK (and chain) when the evidence has no certificate table
  roots: ark.pem             # trusted ARKs; default AMD's (tests use their own)
tdx:
  mrtd: [<96 hex>]
  rtmrs: [[<rtmr0>, <rtmr1>, <rtmr2>, null]]   # accepted sets; null: any value
  td_attributes: "0x10000000"                  # the TD's ATTRIBUTES, exactly (bit 0 debug)
  accepted_tcb_status: [UpToDate]
  collateral: collateral.json                  # dcap-qvl QuoteCollateralV3 JSON
resources:
  gcvm/model/key: model.key                    # <repository>/<type>/<tag>: file
  gcvm/other/key:                              # released only to these measurements (SNP
    file: other.key                            # MEASUREMENT or TDX MRTD); without the list,
    measurements: [<96 hex>]                   # to any the policy accepts
```
Debug guests are always refused (there is no switch). Relative paths are from the file's folder.
Every value is checked on load (type, range): a wrong one is a one-line error naming its field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UsageError


@dataclass
class SnpGuestPolicy:
    """Pins on the SNP guest policy the guest was launched with (None: not checked)."""

    smt: bool | None = None
    migrate_ma: bool | None = None
    single_socket: bool | None = None
    abi_min: tuple[int, int] | None = None


@dataclass
class SnpPolicy:
    measurements: list[str] = field(default_factory=list)
    min_tcb: dict[str, int] = field(default_factory=dict)
    vmpl: list[int] | None = field(default_factory=lambda: [0])
    certs: Path | None = None
    roots: Path | None = None
    allow_debug: bool = False
    guest_policy: SnpGuestPolicy = field(default_factory=SnpGuestPolicy)
    # HOST_DATA the guest must carry (pods: the first 32 bytes of the initdata digest)
    host_data: list[str] = field(default_factory=list)


@dataclass
class TdxPolicy:
    mrtd: list[str] = field(default_factory=list)
    rtmrs: list[list[str | None]] = field(default_factory=list)
    accepted_tcb_status: list[str] = field(default_factory=lambda: ["UpToDate"])
    collateral: Path | None = None
    allow_debug: bool = False
    td_attributes: int | None = None  # None: any (debug is refused regardless)
    mr_config_id: list[str] = field(default_factory=list)  # pods: the initdata digest (48 bytes)


@dataclass
class Policy:
    snp: SnpPolicy | None = None
    tdx: TdxPolicy | None = None
    resources: dict[str, Path] = field(default_factory=dict)
    # a resource named here goes only to a session with one of these measurements
    resource_measurements: dict[str, list[str]] = field(default_factory=dict)
    nonce_ttl_s: float = 60.0
    token_ttl_s: float = 300.0
    source: str = "<built in>"


_TCB_KEYS = {"bootloader", "tee", "snp", "microcode", "fmc"}


def _hexes(values: Any, what: str, size: int = 48) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, list):
        raise UsageError(f"policy: {what} must be a list of hex strings")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise UsageError(f"policy: {what} entry {v!r} is not a hex string")
        text = v.strip().lower().removeprefix("0x")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise UsageError(f"policy: {what} entry {v!r} is not hex") from None
        if len(raw) != size:
            raise UsageError(f"policy: {what} entry has {len(raw)} bytes, expected {size}")
        out.append(raw.hex())
    return out


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"policy: {what} must be a mapping")
    return value


def _list(value: Any, what: str, kind: str) -> list[Any]:
    if not isinstance(value, list):
        raise UsageError(f"policy: {what} must be a list of {kind}")
    return value


def _integer(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"policy: {what} must be an integer from {low} to {high}, not {value!r}")
    return value


def _seconds(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0 < value <= 86400:
        raise UsageError(f"policy: {key} must be a positive number of seconds (at most a day), "
                         f"not {value!r}")  # fmt: skip
    return float(value)


def _path(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise UsageError(f"policy: {what} must be a path, not {value!r}")
    return value


def _only(section: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise UsageError(
            f"policy: unknown key(s) {', '.join(sorted(unknown))} in {where}",
            hint=f"known: {', '.join(sorted(allowed))}",
        )


def _debug(section: dict[str, Any], where: str) -> bool:
    if section.get("allow_debug", False) is not False:
        raise UsageError(
            f"policy: {where}.allow_debug must be false",
            hint="a debug guest's memory is readable by the host: the broker never releases to one",
        )
    return False


_GUEST_POLICY_BITS = ("smt", "migrate_ma", "single_socket")


def _guest_policy(value: Any) -> SnpGuestPolicy:
    if value is None:
        return SnpGuestPolicy()
    section = _mapping(value, "snp.guest_policy")
    _only(section, {*_GUEST_POLICY_BITS, "abi_min"}, "snp.guest_policy")
    pins = SnpGuestPolicy()
    for key in _GUEST_POLICY_BITS:
        bit = section.get(key)
        if bit is not None and not isinstance(bit, bool):
            raise UsageError(f"policy: snp.guest_policy.{key} must be true or false, not {bit!r}")
        setattr(pins, key, bit)
    if (abi := section.get("abi_min")) is not None:
        major, dot, minor = str(abi).partition(".")
        ok = dot and major.isdigit() and minor.isdigit()
        if not ok or int(major) > 255 or int(minor) > 255:
            raise UsageError(f"policy: snp.guest_policy.abi_min must be \"MAJOR.MINOR\" (0-255 "
                             f"each), not {abi!r}")  # fmt: skip
        pins.abi_min = (int(major), int(minor))
    return pins


def _td_attributes(value: Any) -> int | None:
    if value is None:
        return None
    try:
        number = int(value, 16) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**64:
        raise UsageError(f"policy: tdx.td_attributes must be a 64-bit hex value such as "
                         f"\"0x10000000\", not {value!r}")  # fmt: skip
    if number & 1:
        raise UsageError(
            "policy: tdx.td_attributes has bit 0 (DEBUG) set",
            hint="a debug TD's memory is readable by the host: never accepted",
        )
    return number


def unpinned(policy: Policy) -> list[str]:
    """The claims a policy leaves open: evidence passes whatever it says there."""
    found = []
    if (snp := policy.snp) is not None:
        if not snp.measurements:
            found.append("snp measurement (the broker then refuses every guest)")
        if not snp.min_tcb:
            found.append("snp tcb floor")
        elif missing := sorted({"bootloader", "tee", "snp", "microcode"} - set(snp.min_tcb)):
            found.append(f"snp tcb floor of {', '.join(missing)}")
        if snp.vmpl is None:
            found.append("snp vmpl")
        gp = snp.guest_policy
        found += [f"snp {name} policy bit" for name, pin in (("smt", gp.smt),
                  ("migration agent", gp.migrate_ma), ("single socket", gp.single_socket))
                  if pin is None]  # fmt: skip
        if gp.abi_min is None:
            found.append("snp abi minimum")
    if (tdx := policy.tdx) is not None:
        if not tdx.mrtd:
            found.append("tdx mrtd (the broker then refuses every guest)")
        if not tdx.rtmrs:
            found.append("tdx rtmrs (kernel, initrd, command line)")
        if tdx.td_attributes is None:
            found.append("tdx td attributes")
    return found


def parse_policy(data: Any, base: Path, source: str = "<dict>") -> Policy:
    if not isinstance(data, dict):
        raise UsageError(f"policy {source} is not a mapping")
    _only(data, {"snp", "tdx", "resources", "nonce_ttl_s", "token_ttl_s"}, "the policy")

    def rel(section: dict[str, Any], key: str, where: str) -> Path | None:
        value = _path(section.get(key), f"{where}.{key}")
        return None if value is None else base / value

    policy = Policy(source=source)
    if (snp := data.get("snp")) is not None:
        _only(_mapping(snp, "snp"), {"measurements", "min_tcb", "vmpl", "certs", "roots",
                                     "allow_debug", "guest_policy", "host_data"},
              "snp")  # fmt: skip
        min_tcb = snp.get("min_tcb") or {}
        if not isinstance(min_tcb, dict) or set(min_tcb) - _TCB_KEYS:
            raise UsageError(f"policy: snp.min_tcb takes {', '.join(sorted(_TCB_KEYS))}")
        vmpls = snp.get("vmpl", [0])
        if not isinstance(vmpls, list) or not vmpls:  # an empty `vmpl:` would accept any VMPL
            raise UsageError(f"policy: snp.vmpl must be a list of accepted VMPLs (0-3), not "
                             f"{vmpls!r}")  # fmt: skip
        for v in vmpls:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 3:
                raise UsageError(f"policy: snp.vmpl must be a list of VMPLs 0-3, not {vmpls!r}")
        policy.snp = SnpPolicy(
            measurements=_hexes(snp.get("measurements"), "snp.measurements"),
            min_tcb={str(k): _integer(v, f"snp.min_tcb.{k}", 0, 255) for k, v in min_tcb.items()},
            vmpl=list(vmpls),
            certs=rel(snp, "certs", "snp"),
            roots=rel(snp, "roots", "snp"),
            allow_debug=_debug(snp, "snp"),
            guest_policy=_guest_policy(snp.get("guest_policy")),
            host_data=_hexes(snp.get("host_data"), "snp.host_data", 32),
        )
    if (tdx := data.get("tdx")) is not None:
        _only(_mapping(tdx, "tdx"), {"mrtd", "rtmrs", "accepted_tcb_status", "collateral",
                                     "allow_debug", "td_attributes", "mr_config_id"},
              "tdx")  # fmt: skip
        rtmrs = []
        for entry in _list(tdx.get("rtmrs") or [], "tdx.rtmrs", "4-entry lists"):
            if not isinstance(entry, list) or len(entry) != 4:
                raise UsageError("policy: each tdx.rtmrs entry is a list of 4 (hex or null)")
            rtmrs.append([None if v is None else _hexes([v], "tdx.rtmrs")[0] for v in entry])
        statuses = _list(tdx.get("accepted_tcb_status", ["UpToDate"]),
                         "tdx.accepted_tcb_status", "TCB status names")  # fmt: skip
        if not all(isinstance(v, str) for v in statuses):
            raise UsageError("policy: tdx.accepted_tcb_status must be a list of TCB status names")
        policy.tdx = TdxPolicy(
            mrtd=_hexes(tdx.get("mrtd"), "tdx.mrtd"),
            rtmrs=rtmrs,
            accepted_tcb_status=list(statuses),
            collateral=rel(tdx, "collateral", "tdx"),
            allow_debug=_debug(tdx, "tdx"),
            td_attributes=_td_attributes(tdx.get("td_attributes")),
            mr_config_id=_hexes(tdx.get("mr_config_id"), "tdx.mr_config_id"),
        )
    for name, path in _mapping(data.get("resources") or {}, "resources").items():
        parts = str(name).split("/")
        if len(parts) != 3 or not all(p and p not in (".", "..") for p in parts):
            raise UsageError(f"policy: resource {name!r} is not <repository>/<type>/<tag>")
        if isinstance(path, dict):
            _only(path, {"file", "measurements"}, f"resource {name}")
            measurements = path.get("measurements")
            if measurements is not None:  # an empty list: released to nobody
                allowed = _hexes(measurements, f"resource {name}.measurements")
                policy.resource_measurements[str(name)] = allowed
            path = path.get("file")
        file = _path(path, f"resource {name}")
        if not file:
            raise UsageError(f"policy: resource {name} names no file")
        policy.resources[str(name)] = base / file
    policy.nonce_ttl_s = _seconds(data, "nonce_ttl_s", policy.nonce_ttl_s)
    policy.token_ttl_s = _seconds(data, "token_ttl_s", policy.token_ttl_s)
    return policy


def parse_measurements(text: str, source: str) -> list[str]:
    """A repository key's measurement list: one hex measurement a line, `#` comments."""
    words = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return _hexes([w for w in words if w], source)


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read policy {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"policy {path} does not parse: {exc}") from None
    return parse_policy(data, path.resolve().parent, str(path))
