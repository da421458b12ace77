"""The `keyrelease` verb: fetch one resource from the key broker with this guest's evidence; print
one JSON line (attested, tee, label, seconds; never the secret) and write the secret to FILE
(mode 0600) if asked. `python -m groupcover keyrelease ...` and, in guests (without importing
torch: start-up cost on a slow CPU), `python -m groupcover.keyrelease ...`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from groupcover.argtypes import output_file, positive_float
from groupcover.errors import GroupCoverError
from groupcover.keyrelease.evidence import detect
from groupcover.keyrelease.kbs import PROTOCOL_VERSION, PROTOCOLS, KbsClient

DESCRIPTION = "fetch one resource from the key broker with this guest's evidence"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, help="http://HOST:PORT of the key broker")
    parser.add_argument("--tee", required=True, choices=["snp", "tdx", "none"])
    parser.add_argument("--resource", default="gcvm/model/key", help="<repository>/<type>/<tag>")
    parser.add_argument("--out", type=output_file("--out"),
                        help="write the released secret here (mode 0600)")  # fmt: skip
    parser.add_argument("--timeout", type=positive_float("--timeout"), default=30.0)
    parser.add_argument("--protocol", default=PROTOCOL_VERSION, choices=list(PROTOCOLS))


def run(args: argparse.Namespace) -> int:
    try:
        client = KbsClient(
            args.broker, detect(args.tee), timeout=args.timeout, protocol=args.protocol
        )
        release = client.get_resource(args.resource)
    except GroupCoverError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(release.secret)
    print(
        json.dumps(
            {
                "attested": release.attested,
                "tee": release.tee,
                "label": release.label,
                "seconds": round(release.seconds, 4),
                "bytes": len(release.secret),
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupcover.keyrelease")
    add_arguments(parser)
    return run(parser.parse_args(argv))
