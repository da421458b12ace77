"""The model key from a confidential pod's Confidential Data Hub (CoCo).

In a CoCo pod (Kata with a TEE, or kata-qemu-coco-dev without one) the guest runs the
Confidential Data Hub beside the containers. Asked for a resource,

    GET http://127.0.0.1:8006/cdh/resource/<repo>/<type>/<tag>

it has the guest's Attestation Agent attest to the key broker (KBS) that the pod's initdata
names, and answers with the plaintext resource. The broker and its certificate come from
`cdh.toml` in the initdata, whose digest the hardware evidence carries (TDX `mr_config_id`,
SEV-SNP `hostdata`), so the broker's policy decides which initdata it releases the key to.

What this process knows, and what it does not: it talks to the CDH over the pod's loopback and
sees neither the evidence nor the broker's answer, so a release through the CDH is labelled as
such and never `attested` in this process's own sense. It is asked for with `--broker cdh://`
(`cdh://HOST:PORT` for a CDH on another loopback port; only loopback addresses are accepted:
the CDH serves the pod's own containers and no other address is the pod's).
"""

from __future__ import annotations

import http.client
import re
import time
from dataclasses import dataclass

from groupcover.errors import UsageError
from groupcover.keyrelease.kbs import KeyReleaseError, KeyReleaseRefused

SCHEME = "cdh://"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8006
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_RESOURCE_BYTES = 64 * 1024
SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
LABEL = ("model key released by the pod's Confidential Data Hub (it attested the pod to the "
         "broker its initdata names; this process saw neither evidence nor broker)")  # fmt: skip


def is_cdh(url: str | None) -> bool:
    return url is not None and url.startswith(SCHEME)


def endpoint(url: str) -> tuple[str, int]:
    """The CDH's loopback host and port of a `cdh://[HOST:PORT]` URL."""
    rest = url[len(SCHEME) :].rstrip("/")
    if not rest:
        return DEFAULT_HOST, DEFAULT_PORT
    host, sep, port = rest.rpartition(":")
    if not sep or host not in LOOPBACK or not (port.isascii() and port.isdigit()):
        raise UsageError(f"--broker {url!r}: a CDH is reached on loopback, cdh:// or "
                         "cdh://127.0.0.1:PORT", hint="the pod's CDH listens on "
                         f"{DEFAULT_HOST}:{DEFAULT_PORT}")  # fmt: skip
    if not 0 < int(port) < 65536:
        raise UsageError(f"--broker {url!r}: port {port} is not a TCP port")
    return host.strip("[]"), int(port)


def resource_path(resource: str) -> str:
    parts = resource.strip("/").split("/")
    if len(parts) != 3 or not all(SEGMENT.match(p) and p not in (".", "..") for p in parts):
        raise UsageError(f"resource {resource!r} is not <repository>/<type>/<tag>")
    return "/cdh/resource/" + "/".join(parts)


@dataclass(frozen=True)
class CdhRelease:
    secret: bytes
    seconds: float
    endpoint: str


def get_resource(url: str, resource: str, timeout_s: float = 60.0) -> CdhRelease:
    host, port = endpoint(url)
    path = resource_path(resource)
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Accept": "application/octet-stream"})
        reply = conn.getresponse()
        body = reply.read(MAX_RESOURCE_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise KeyReleaseError(f"the Confidential Data Hub at {host}:{port} did not answer: "
                              f"{exc}", hint="run in a CoCo pod (its CDH serves 127.0.0.1:8006), "
                              "or use --broker http(s)://KBS with --tee") from None  # fmt: skip
    finally:
        conn.close()
    if reply.status != 200:
        reason = body[:200].decode("utf-8", "replace").strip()
        raise KeyReleaseRefused(f"the Confidential Data Hub refused {resource}: HTTP "
                                f"{reply.status} {reason}".rstrip())  # fmt: skip
    if len(body) > MAX_RESOURCE_BYTES:
        raise KeyReleaseError(f"the Confidential Data Hub sent more than {MAX_RESOURCE_BYTES} "
                              f"bytes for {resource}")  # fmt: skip
    return CdhRelease(body, time.monotonic() - started, f"{host}:{port}")
