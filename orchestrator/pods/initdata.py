"""CoCo initdata: the TOML a confidential pod's guest is given, its annotation and its digest.

A Kata/CoCo pod carries initdata in the annotation `io.katacontainers.config.hypervisor.
cc_init_data` as base64(gzip(TOML)). The TOML names its digest algorithm and holds files under
`[data]`: the Attestation Agent's `aa.toml` and the Confidential Data Hub's `cdh.toml` (both name
the key broker, and `kbs_cert` pins its certificate), and gcvm's own `gcvm.toml` with the owner's
pins. The runtime binds the digest of the raw TOML into the hardware evidence: TDX `mr_config_id`
(48 bytes: a sha384 digest fills it), SEV-SNP `hostdata` (32 bytes: the first 32 of the digest).
So the broker sees which initdata a pod booted with. Initdata is integrity, not secrecy: the host
writes the annotation and reads it.

The encoding is deterministic (gzip with mtime 0), so the same inputs give the same annotation.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from dataclasses import dataclass

from orchestrator.attest.identity import b64url
from orchestrator.ownerid import OwnerIdentity

VERSION = "0.1.0"
ALGORITHM = "sha384"
ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
TDX_FIELD_BYTES = 48  # mr_config_id
SNP_FIELD_BYTES = 32  # hostdata
GCVM_FILE = "gcvm.toml"


def _quote(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for these characters)."""
    return json.dumps(value, ensure_ascii=True)


def _literal_block(text: str) -> str:
    if "'''" in text:
        raise ValueError("an initdata file may not contain '''")
    return f"'''\n{text}'''"


def files(kbs_url: str | None, owner: OwnerIdentity | None) -> dict[str, str]:
    """The `[data]` files: the guest components' configuration and gcvm's pins."""
    out: dict[str, str] = {}
    cert_pem = owner_cert_pem(owner) if owner is not None else None
    if kbs_url is not None:
        aa = f"[token_configs.kbs]\nurl = {_quote(kbs_url)}\n"
        cdh = f'[kbc]\nname = "cc_kbc"\nurl = {_quote(kbs_url)}\n'
        if cert_pem is not None:
            aa += f"cert = {_quote(cert_pem)}\n"
            cdh += f"kbs_cert = {_quote(cert_pem)}\n"
        out["aa.toml"] = aa
        out["cdh.toml"] = cdh
    if owner is not None:
        out[GCVM_FILE] = (
            f"broker_cert = {_quote(b64url(owner.broker_cert))}\n"
            f"owner_key = {_quote(b64url(owner.owner_key))}\n"
        )
    return out


def owner_cert_pem(owner: OwnerIdentity) -> str:
    return (
        "-----BEGIN CERTIFICATE-----\n"
        + "\n".join(
            base64.b64encode(owner.broker_cert)[i : i + 64].decode()
            for i in range(0, len(base64.b64encode(owner.broker_cert)), 64)
        )
        + "\n-----END CERTIFICATE-----\n"
    )


def toml_text(data: dict[str, str]) -> str:
    lines = [f"version = {_quote(VERSION)}", f"algorithm = {_quote(ALGORITHM)}", "", "[data]"]
    lines += [f"{_quote(name)} = {_literal_block(text)}" for name, text in sorted(data.items())]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Initdata:
    toml: str

    @property
    def annotation(self) -> str:
        """base64 (standard alphabet, padded) of the gzip of the raw TOML."""
        return base64.b64encode(gzip.compress(self.toml.encode(), mtime=0)).decode()

    @property
    def digest(self) -> bytes:
        return hashlib.new(ALGORITHM, self.toml.encode()).digest()

    @property
    def tdx_mr_config_id(self) -> bytes:
        return self.digest[:TDX_FIELD_BYTES].ljust(TDX_FIELD_BYTES, b"\0")

    @property
    def snp_hostdata(self) -> bytes:
        return self.digest[:SNP_FIELD_BYTES].ljust(SNP_FIELD_BYTES, b"\0")

    def describe(self) -> list[str]:
        return [
            f"initdata {ALGORITHM}: {self.digest.hex()}",
            f"  TDX mr_config_id holds it whole ({TDX_FIELD_BYTES} bytes): "
            f"{self.tdx_mr_config_id.hex()}",
            f"  SEV-SNP hostdata holds its first {SNP_FIELD_BYTES} bytes: "
            f"{self.snp_hostdata.hex()}",
            "  pin it in the broker's policy: tdx.mr_config_id or snp.host_data (a list of hex)",
        ]


def make(kbs_url: str | None, owner: OwnerIdentity | None) -> Initdata:
    return Initdata(toml_text(files(kbs_url, owner)))


def decode(annotation: str) -> str:
    """The raw TOML of an annotation value (for checks and `gcvm` tests)."""
    return gzip.decompress(base64.b64decode(annotation, validate=True)).decode()
