"""`gcvm attest verify` and `gcvm broker serve` (registered by orchestrator.cli)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer

from orchestrator.errors import UsageError

attest_app = typer.Typer(help="Verify attestation evidence offline.", no_args_is_help=True)
broker_app = typer.Typer(help="The owner's key broker (KBS protocol).", no_args_is_help=True)


def _guess_tee(raw: bytes) -> str:
    from orchestrator.attest import snp

    if len(raw) == snp.REPORT_SIZE:
        return "snp"
    if len(raw) >= 8 and int.from_bytes(raw[4:8], "little") == 0x81:
        return "tdx"
    raise UsageError(
        f"cannot tell what this evidence is ({len(raw)} bytes)",
        hint="give --tee snp (a 1184-byte report) or --tee tdx (a DCAP quote)",
    )


@attest_app.command("verify")
def verify_cmd(
    files: list[Path] = typer.Argument(
        None, help="SEV-SNP reports (raw or hex) or TDX quotes (none, with --policy: its pins)."
    ),
    tee: str | None = typer.Option(None, help="snp or tdx (default: from the file)."),
    certs: Path | None = typer.Option(
        None, help="SNP: folder with the report's VCEK or VLEK (and AMD's chain, else built in)."
    ),
    collateral: Path | None = typer.Option(
        None, help="TDX: dcap-qvl QuoteCollateralV3 JSON (TCB info, QE identity, CRLs)."
    ),
    now: int | None = typer.Option(None, help="Verify as at this UNIX time (default: now)."),
    policy: Path | None = typer.Option(
        None, help="Also apply a broker policy's reference values (measurement, TCB, MRTD...)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print claims and verdict as JSON."),
) -> None:
    """Verify reports or quotes offline; print each one's claims and verdict (exit 0 all valid,
    1 one invalid, 2 bad input). With --policy, first name every claim it leaves unpinned."""
    from orchestrator.attest.common import EvidenceRefused
    from orchestrator.attest.policy import load_policy, unpinned
    from orchestrator.ui import warn

    if tee == "sev-snp":
        tee = "snp"
    if tee not in (None, "snp", "tdx"):
        raise UsageError(f"unknown --tee {tee!r}", hint="snp or tdx")
    if not files and policy is None:
        raise UsageError("nothing to verify", hint="give a report or quote (or --policy FILE)")
    pol = load_policy(policy) if policy else None
    if pol is not None:
        for item in unpinned(pol):
            warn(f"unpinned: {item}")
    refused = []
    for file in files or []:
        try:
            _verify_one(file, tee, certs, collateral, now, pol, as_json)
        except EvidenceRefused as exc:
            if len(files) == 1:
                raise
            refused.append(f"{file}: {exc.message}")
    if refused:
        raise EvidenceRefused(f"{len(refused)} of {len(files)} refused: " + "; ".join(refused))


def _verify_one(
    file: Path,
    tee: str | None,
    certs: Path | None,
    collateral: Path | None,
    now: int | None,
    pol: Any,
    as_json: bool,
) -> None:
    from orchestrator.attest import snp, tdx
    from orchestrator.attest.common import BadEvidence, EvidenceRefused
    from orchestrator.ui import out

    try:
        raw = snp.read_report_file(file)
    except BadEvidence as exc:
        raise UsageError(exc.message) from None
    kind = tee or _guess_tee(raw)
    if kind == "snp":
        snp.parse_report(raw)  # bad input before missing certificates
        when = dt.datetime.fromtimestamp(now, dt.UTC) if now is not None else None
        cert_set = snp.SnpCerts.load_dir(certs) if certs else None
        if cert_set is None and pol and pol.snp and pol.snp.certs:
            cert_set = snp.SnpCerts.load_dir(pol.snp.certs)
        if cert_set is None:
            raise UsageError(
                "an SEV-SNP report is verified with its VCEK or VLEK, which it does not carry",
                hint="give --certs DIR (the VCEK/VLEK; AMD's chain is built in)",
            )
        verdict = snp.verify_report(raw, cert_set, now=when)
        if pol and pol.snp and verdict.verified:
            snp.check_policy(verdict, pol.snp)
    else:
        path = collateral or (pol.tdx.collateral if pol and pol.tdx else None)
        text = tdx.read_collateral(path) if path else None
        accepted = tuple(pol.tdx.accepted_tcb_status) if pol and pol.tdx else ("UpToDate",)
        verdict = tdx.verify_quote(raw, text, now=now, accepted_status=accepted)
        if pol and pol.tdx and verdict.verified:
            tdx.check_policy(verdict, pol.tdx)
    if as_json:
        doc = {
            "tee": verdict.tee,
            "valid": verdict.valid,
            "verified": verdict.verified,
            "failures": verdict.failures,
            "claims": verdict.claims,
        }
        out.print_json(json.dumps(doc))
    else:
        out.print(f"{kind} evidence {file}", soft_wrap=True)
        for key, value in verdict.claims.items():
            out.print(f"  {key:<22} {value}", soft_wrap=True, markup=False, highlight=False)
        for item in verdict.verified:
            out.print(f"  [green]verified[/] {item}", soft_wrap=True)
        if verdict.valid:
            out.print("[green]verdict: valid[/]")
    if not verdict.valid:
        raise EvidenceRefused(f"verdict: invalid: {verdict.reason}")


@attest_app.command("measure")
def measure_cmd(
    ovmf: Path = typer.Option(..., help="The SEV-SNP OVMF image (e.g. OVMF.amdsev.fd)."),
    kernel: Path = typer.Option(..., help="The guest kernel of the measured direct boot."),
    initrd: Path | None = typer.Option(None, help="Its initrd."),
    append: str = typer.Option("", help="The kernel command line, exactly as the domain has it."),
    vcpus: int = typer.Option(1, help="vCPUs of the guest."),
    vcpu_type: str = typer.Option("EPYC-v4", help="QEMU CPU model (EPYC-v4, EPYC-Milan, ...)."),
    guest_features: str = typer.Option(
        "0x1", help="VMSA SEV_FEATURES (0x1; 0x21 for guest kernels >= 6.6)."
    ),
) -> None:
    """Print the SEV-SNP launch digest (measurement) a guest booted this way must report: the
    value for a broker policy's snp.measurements (sev-snp-measure)."""
    from orchestrator.attest.measure import snp_launch_digest
    from orchestrator.ui import out

    try:
        features = int(guest_features, 0)
    except ValueError:
        raise UsageError(f"--guest-features {guest_features!r} is not an integer") from None
    digest = snp_launch_digest(
        ovmf, kernel, initrd, append, vcpus=vcpus, vcpu_type=vcpu_type, guest_features=features
    )
    out.print(digest.hex(), soft_wrap=True)


@attest_app.command("firmware")
def firmware_cmd(
    tee: str = typer.Option("sev-snp", help="sev-snp (ovmf-amdsev) or tdx (ovmf-inteltdx)."),
) -> None:
    """Download Debian's confidential-VM firmware (once; cached, never installed) and print its
    path: the OVMF that `gcvm attest policy --firmware` measures against."""
    from orchestrator.attest.firmware import PACKAGES, cached_firmware, fetch_firmware
    from orchestrator.ui import console, out, step

    if tee not in PACKAGES:
        raise UsageError(f"unknown --tee {tee!r}", hint="sev-snp or tdx")
    found = cached_firmware(tee)
    if found is None:
        with step(f"download Debian's {PACKAGES[tee].package} (apt-get download, dpkg-deb -x)"):
            found = fetch_firmware(tee)
    console.print(
        f"{found.package} {found.version} (.deb sha256 {found.deb_sha256}); "
        f"{found.path.name} sha256 {found.sha256}",
        soft_wrap=True,
    )
    out.print(str(found.path), soft_wrap=True)


def _locked_params(source: Path | None) -> str:
    """The locked master's command line parameters for the code of `source` (its code disk's
    root hash, computed in a scratch folder)."""
    import tempfile

    from orchestrator import codedisk, deploy
    from orchestrator.ui import info

    root = source.resolve() if source is not None else deploy.project_root()
    with tempfile.TemporaryDirectory(prefix="gcvm-code-") as tmp:
        disk = codedisk.build(Path(tmp) / "code.img", root)
    info(f"locked masters run {root}/groupcover: code disk root hash {disk.root_hash}")
    return disk.cmdline()


@attest_app.command("policy")
def policy_cmd(
    image: Path = typer.Option(..., "--image", help="The image folder (gcvm image info: root)."),
    firmware: Path = typer.Option(
        ..., help="The OVMF the VM boots: OVMF.amdsev.fd (see 'gcvm attest firmware')."
    ),
    vcpus: int = typer.Option(..., help="vCPUs of the guest (each one's VMSA is measured)."),
    out_path: Path = typer.Option(..., "--out", help="Write the policy here (YAML; .json: JSON)."),
    tee: str = typer.Option("sev-snp", help="sev-snp or tdx."),
    vcpu_type: str = typer.Option("EPYC-v4", help="QEMU CPU model the VM runs with."),
    cmdline_extra: str = typer.Option(
        "", help="What the VM's command line adds to the image's (gcvm.broker_cert=... ...)."
    ),
    owner: Path | None = typer.Option(
        None,
        "--owner",
        help="An owner folder whose identities the guests pin (broker certificate, package "
        "signer): their kernel command line parameters, as `gcvm up --owner` appends them.",
    ),
    min_tcb: str = typer.Option(
        "", help="SNP TCB floor: bootloader=N,tee=N,snp=N,microcode=N (none: unpinned)."
    ),
    vmpl: int = typer.Option(0, help="The VMPL the guest's reports come from."),
    guest_features: str = typer.Option(
        "0x1", help="SNP VMSA SEV_FEATURES the host's QEMU sets (0x1; 0x21 with DebugSwap)."
    ),
    snp_policy: str = typer.Option(
        "0x30000", help="The SNP guest policy the VM is launched with (gcvm's default)."
    ),
    td_attributes: str = typer.Option(
        "0x10000000", help="TDX: the TD attributes the VM is launched with (sept-ve-disable)."
    ),
    mrtd: list[str] = typer.Option(
        [], "--mrtd", help="TDX: an MRTD seen in a known-good launch (repeatable)."
    ),
    code: Path | None = typer.Option(
        None,
        "--code",
        help="The source checkout whose groupcover/ the locked masters run (its code disk's "
        "dm-verity root hash is in their command line; default: this checkout).",
    ),
) -> None:
    """Compute a broker policy's reference values from an image and its firmware, on the
    owner's machine: the SEV-SNP launch digest (sev-snp-measure), VMPL, guest policy bits, TCB
    floor; for TDX the TD attributes. A TEE cluster's masters are locked: the command line
    measured is the image's, the owner's pins, then `gcvm.locked=1` and the code disk's root
    hash, which this computes from the source as `gcvm up` does (the build is reproducible).
    Exit 2 on a missing or changed input."""
    import json as _json

    from orchestrator.attest.policy import _hexes
    from orchestrator.attest.reference import parse_min_tcb, reference_policy, render_policy
    from orchestrator.ui import console, info, out, step, warn

    tee = "sev-snp" if tee == "snp" else tee
    numbers = {}
    for name, text in (("--guest-features", guest_features), ("--snp-policy", snp_policy),
                       ("--td-attributes", td_attributes)):  # fmt: skip
        try:
            numbers[name] = int(text, 0)
        except ValueError:
            raise UsageError(f"{name} {text!r} is not an integer") from None
    if vcpus < 1:
        raise UsageError(f"--vcpus {vcpus}: at least 1")
    if owner is not None:
        from orchestrator import ownerid

        if cmdline_extra:
            raise UsageError("--owner and --cmdline-extra: give one",
                             hint="--owner appends the owner's pins itself")  # fmt: skip
        if not owner.is_dir():
            raise UsageError(f"--owner {owner}: no such folder")
        cmdline_extra = ownerid.ensure(owner).cmdline
        info(f"pins of {owner}: {cmdline_extra[:60]}...")
    cmdline_extra = " ".join(filter(None, [cmdline_extra, _locked_params(code)]))
    title = "measure the SEV-SNP launch" if tee == "sev-snp" else "pin the TD's attributes"
    with step(f"{title} ({image}, {vcpus} vCPU)"):
        ref = reference_policy(
            image, firmware, tee=tee, vcpus=vcpus, vcpu_type=vcpu_type,
            cmdline_extra=cmdline_extra, min_tcb=parse_min_tcb(min_tcb), vmpl=vmpl,
            guest_features=numbers["--guest-features"], snp_policy=numbers["--snp-policy"],
            td_attributes=numbers["--td-attributes"],
            mrtd=tuple(_hexes(mrtd, "--mrtd")),
        )  # fmt: skip
    text = (
        _json.dumps(ref.policy, indent=2) + "\n"
        if out_path.suffix == ".json"
        else render_policy(ref)
    )
    out_path.write_text(text)
    for key, value in ref.inputs.items():
        console.print(f"  {key:<17} {value}", soft_wrap=True, markup=False, highlight=False)
    for note in ref.notes:
        warn(note)
    if "snp" in ref.policy:
        info(f"measured in {ref.seconds:.2f} s")
        out.print(ref.policy["snp"]["measurements"][0], soft_wrap=True)
    console.print(f"wrote {out_path}", soft_wrap=True)


@broker_app.command("serve")
def serve_cmd(
    policy: Path | None = typer.Option(
        None, help="Policy file (YAML/JSON): reference values and resources."
    ),
    listen: str = typer.Option("127.0.0.1:8080", help="HOST:PORT to bind (that address only)."),
    resource: list[str] = typer.Option(
        [], "--resource", help="NAME=FILE, NAME as <repository>/<type>/<tag> (repeatable)."
    ),
    insecure_no_attestation: bool = typer.Option(
        False,
        "--insecure-no-attestation",
        help="Release keys to guests without a TEE (tee 'sample'); for --tee none only.",
    ),
    log_file: Path | None = typer.Option(None, "--log", help="Also append decisions here."),
    repository: Path | None = typer.Option(
        None,
        "--repository",
        help="Also serve <repo>/<type>/<tag> from the file DIR/<repo>/<type>/<tag>, looked up "
        "at each request (keys added while it runs are served).",
    ),
    decisions: Path | None = typer.Option(
        None, "--decisions", help="Append every decision here as one JSON line."
    ),
    identity: Path | None = typer.Option(
        None,
        "--identity",
        help="The broker's identity folder (`gcvm broker identity DIR`; made if absent): serve "
        "HTTPS with it and sign tokens with its key. Without: plain HTTP, unauthenticated.",
    ),
) -> None:
    """Serve the KBS protocol (auth, attest, resource/<repo>/<type>/<tag>) on HOST:PORT."""
    from orchestrator.attest.broker import make_server
    from orchestrator.attest.identity import load_or_create
    from orchestrator.attest.kbs import INSECURE_LABEL, Broker
    from orchestrator.attest.policy import Policy, load_policy
    from orchestrator.ui import console

    pol = load_policy(policy) if policy else Policy()
    for item in resource:
        name, sep, path = item.partition("=")
        if not sep or len(name.split("/")) != 3:
            raise UsageError(f"--resource {item!r} is not REPO/TYPE/TAG=FILE")
        pol.resources[name] = Path(path)
    if repository is not None and not repository.is_dir():
        raise UsageError(f"--repository {repository}: no such folder")
    if not pol.resources and repository is None:
        raise UsageError("the broker has nothing to release",
                         hint="--resource gcvm/model/key=FILE or --repository DIR")  # fmt: skip
    if pol.snp is None and pol.tdx is None and not insecure_no_attestation:
        raise UsageError(
            "the policy accepts no TEE (no snp or tdx section)",
            hint="write a policy, or --insecure-no-attestation for guests without a TEE",
        )
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise UsageError(f"--listen {listen!r} is not HOST:PORT")
    broker_log = logging.getLogger("gcvm.broker")
    broker_log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s broker %(levelname)s %(message)s"))
    broker_log.addHandler(handler)
    if log_file:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(handler.formatter)
        broker_log.addHandler(file_handler)
    record = None
    if decisions is not None:

        def record(decision: dict[str, object]) -> None:
            with decisions.open("a") as f:
                f.write(json.dumps(decision, default=str) + "\n")

    ident = load_or_create(identity) if identity is not None else None
    broker = Broker(pol, insecure_no_attestation=insecure_no_attestation,
                    repository=repository, on_decision=record, identity=ident)  # fmt: skip
    server = make_server(broker, host.strip("[]"), int(port_text), identity=ident)
    who = (f"identity sha256 {ident.fingerprint}" if ident is not None
           else "no identity: plain HTTP, an unauthenticated demo/test broker")  # fmt: skip
    console.print(
        f"broker listening on {server.url} ({who}; policy {pol.source}; "
        f"resources {', '.join(sorted(pol.resources)) or '-'}"
        + (f"; repository {repository}" if repository is not None else "")
        + ")",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    if insecure_no_attestation:
        console.print(f"[yellow]warning:[/] --insecure-no-attestation: {INSECURE_LABEL}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("broker stopped")
    finally:
        server.server_close()


@broker_app.command("identity")
def identity_cmd(
    folder: Path = typer.Argument(..., help="The identity folder (broker.key, broker.pem)."),
) -> None:
    """Make the broker's identity in FOLDER (or show the one there): its certificate's SHA-256
    and the kernel command line parameter that pins it in a master's measured boot."""
    from orchestrator.attest.identity import KEY_FILE, load_or_create
    from orchestrator.ui import console

    existed = (folder / KEY_FILE).exists()
    ident = load_or_create(folder)
    console.print(f"broker identity {folder} ({'existing' if existed else 'made'}): key "
                  f"{ident.key_file} (keep it secret), certificate {ident.cert_file}",
                  soft_wrap=True, markup=False, highlight=False)  # fmt: skip
    console.print(f"certificate sha256 {ident.fingerprint}", soft_wrap=True, highlight=False)
    console.print("pin it in the master's measured kernel command line:", highlight=False)
    console.print(ident.cmdline_param, soft_wrap=True, markup=False, highlight=False)
