"""The `keyrelease` verb: fetch one resource from the key broker with this guest's evidence; print
one JSON line (attested, tee, label, seconds; never the secret) and write the secret to FILE
(mode 0600) if asked: a new file beside FILE, renamed over it, so that an existing file keeps
none of its mode and a symlink at FILE is replaced, never written through. The broker is
authenticated against the pinned certificate: the measured boot's (`gcvm.broker_cert=` on the
kernel command line), else `--broker-cert FILE`.
`python -m groupcover keyrelease ...` and, in guests (without importing torch: start-up cost on a
slow CPU), `python -m groupcover.keyrelease ...`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys

from groupcover.argtypes import output_file, positive_float
from groupcover.errors import GroupCoverError
from groupcover.keyrelease.evidence import detect
from groupcover.keyrelease.kbs import PROTOCOL_VERSION, PROTOCOLS, KbsClient

DESCRIPTION = "fetch one resource from the key broker with this guest's evidence"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, help="https://HOST:PORT of the key broker")
    parser.add_argument("--broker-cert", metavar="FILE",
                        help="the broker's certificate (PEM or DER), where the measured boot "
                        "pins none; never one that differs from it")  # fmt: skip
    parser.add_argument("--tee", required=True, choices=["snp", "tdx", "none"])
    parser.add_argument("--resource", default="gcvm/model/key", help="<repository>/<type>/<tag>")
    parser.add_argument("--out", type=output_file("--out"),
                        help="write the released secret here (mode 0600)")  # fmt: skip
    parser.add_argument("--timeout", type=positive_float("--timeout"), default=30.0)
    parser.add_argument("--protocol", default=PROTOCOL_VERSION, choices=list(PROTOCOLS))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from groupcover import trust

    try:
        pins = trust.resolve(Path(args.broker_cert) if args.broker_cert else None)
        client = KbsClient(args.broker, detect(args.tee), pins.broker_cert, timeout=args.timeout,
                           protocol=args.protocol)  # fmt: skip
        release = client.get_resource(args.resource)
    except GroupCoverError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    if args.out:
        try:
            write_private(args.out, release.secret)
        except OSError as exc:
            print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    print(
        json.dumps(
            {
                "attested": release.attested,
                "tee": release.tee,
                "label": release.label,
                "seconds": round(release.seconds, 4),
                "bytes": len(release.secret),
                "broker_authenticated": release.authenticated,
                "broker_identity": pins.facts(),
            }
        )
    )
    return 0


def write_private(path: str, data: bytes) -> None:
    """`data` at `path`, mode 0600: written to a new file in the same folder (O_EXCL and
    O_NOFOLLOW: never an existing file, never through a symlink) and renamed over `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)  # a symlink at `path` is replaced, not followed
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupcover.keyrelease")
    add_arguments(parser)
    return run(parser.parse_args(argv))
