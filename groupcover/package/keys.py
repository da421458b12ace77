"""Where the master's model key comes from: a key file, or the owner's key broker (KBS), and
the label every result made with it carries."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groupcover.errors import UsageError
from groupcover.keyrelease import cdh
from groupcover.keyrelease.evidence import detect
from groupcover.keyrelease.kbs import KbsClient
from groupcover.package.layout import KEY, PackageError
from groupcover.package.seal import KEY_BYTES, SealError
from groupcover.trust import Pins

DEFAULT_RESOURCE = "gcvm/model/key"
TEES = ("none", "snp", "tdx")


def read_key(path: str | Path) -> bytes:
    """The 32-byte model key in the file at `path`, refused (one line, a hint to `chmod 600`)
    when group or others may read or write it, or when another user (not root) owns it: a key
    others can read is no longer the owner's secret, one they can write not the owner's key."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            _check_private(path, info)
            key = f.read(KEY_BYTES + 1)
    except OSError as exc:
        raise PackageError(f"cannot read the model key {path}: {exc.strerror or exc}") from None
    if len(key) != KEY_BYTES:
        size = info.st_size if stat.S_ISREG(info.st_mode) else len(key)
        raise SealError(f"{path} is not a model key ({size} bytes, not {KEY_BYTES})",
                        hint=f"use the {KEY} file written by `protect`")  # fmt: skip
    return key


def _check_private(path: str | Path, info: os.stat_result) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise PackageError(f"the model key {path} is readable or writable by group or others "
                           f"(mode {mode:04o})", hint=f"chmod 600 {path}")  # fmt: skip
    uid = os.geteuid()
    if info.st_uid not in (uid, 0):
        raise PackageError(f"the model key {path} is owned by uid {info.st_uid}, not by this "
                           f"user (uid {uid})", hint="copy it into a file of your own, then "
                           "chmod 600 it")  # fmt: skip


@dataclass(frozen=True)
class KeySource:
    key_file: Path | None = None
    broker: str | None = None
    tee: str | None = None
    resource: str = DEFAULT_RESOURCE
    pins: Pins = Pins()  # noqa: RUF009 (frozen: immutable); the broker's pinned certificate

    def validate(self) -> None:
        if self.key_file is not None and self.broker is not None:
            raise UsageError("give --key-file or --broker, not both")
        if self.broker is not None and cdh.is_cdh(self.broker):
            cdh.endpoint(self.broker)  # the pod's CDH gathers the evidence itself: no --tee
            cdh.resource_path(self.resource)
        elif self.broker is not None and self.tee not in TEES:
            raise UsageError("--broker needs --tee none|snp|tdx (the evidence this guest gives)")

    @property
    def given(self) -> bool:
        return self.key_file is not None or self.broker is not None


@dataclass(frozen=True)
class KeyRelease:
    key: bytes
    facts: dict[str, Any]  # for the JSON: source, label, attested, tee, seconds

    @property
    def label(self) -> str:
        return str(self.facts["label"])


def obtain_key(source: KeySource) -> KeyRelease:
    source.validate()
    if cdh.is_cdh(source.broker):
        assert source.broker is not None
        got = cdh.get_resource(source.broker, source.resource)
        if len(got.secret) != KEY_BYTES:
            raise SealError(f"the Confidential Data Hub released {len(got.secret)} bytes for "
                            f"{source.resource}, not a {KEY_BYTES}-byte model key")  # fmt: skip
        facts = {"source": "cdh", "broker": source.broker, "cdh": got.endpoint,
                 "resource": source.resource, "label": cdh.LABEL, "attested": False,
                 "attested_by": "the pod's Confidential Data Hub and the broker in its initdata",
                 "tee": source.tee, "seconds": round(got.seconds, 4)}  # fmt: skip
        return KeyRelease(got.secret, facts)
    if source.broker is not None:
        assert source.tee is not None
        client = KbsClient(source.broker, detect(source.tee), source.pins.broker_cert)
        release = client.get_resource(source.resource)
        if len(release.secret) != KEY_BYTES:
            raise SealError(f"the broker released {len(release.secret)} bytes for "
                            f"{source.resource}, not a {KEY_BYTES}-byte model key")  # fmt: skip
        facts = {"source": "broker", "broker": source.broker, "resource": source.resource,
                 "label": release.label, "attested": release.attested, "tee": release.tee,
                 "seconds": round(release.seconds, 4), "broker_identity": source.pins.facts(),
                 "broker_authenticated": release.authenticated}  # fmt: skip
        return KeyRelease(release.secret, facts)
    if source.key_file is not None:
        key = read_key(source.key_file)
        return KeyRelease(key, {"source": "file", "label": "model key read from a key file "
                                "(no broker, no attestation)", "attested": False})  # fmt: skip
    raise UsageError(
        "a model package needs its model key",
        hint="pass --key-file FILE, --broker URL --tee none|snp|tdx to have it released, or "
        "--broker cdh:// in a confidential pod",
    )


def in_memory(key: bytes) -> KeyRelease:
    """A package protected on the fly in this process (a built-in model name)."""
    return KeyRelease(key, {"source": "built-in", "label": "built-in model protected on the fly "
                            "(key never left this process)", "attested": False})  # fmt: skip
