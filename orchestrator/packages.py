"""Model packages for `gcvm run bench`: protect on the host, copy into the VMs, release
the keys through the owner's broker for the run.

- Planning (`plan_protect`): which schemes the modes need (one package per scheme), whether the
  plaintext baselines must be sealed (a baseline mode, or the audit), and the reference shape (the
  run's batch x seq). Pure: tested without a daemon.
- Protecting a built-in name (`protect_builtin`): `python -m groupcover protect ...` with the
  checkout's venv, as `gcvm model protect` does; packages go into the cluster's state folder,
  keys into the owner folder (`owner_dir`), which nothing else of gcvm writes to. A package whose
  manifest and key are already there (same model, scheme, baselines, reference) is reused.
- Copying (`copy_plan`, `copy_to`): over the VMs' SFTP into GUEST_ROOT/<package_id>/, never the
  key, baselines.sealed only where a baseline mode or the audit runs, workers only the manifest
  and the published weights; a file whose SHA-256 the guest's digest list already names is skipped.
- What the run's broker serves (`broker_resources`) and where (`bridge_address`); the broker
  itself is `orchestrator.runbroker`.

The orchestrator never imports the framework: it reads the public manifest.json (JSON) only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator import ownerid, paths
from orchestrator.errors import GcvmError, UsageError
from orchestrator.keys import check_private
from orchestrator.ui import console

GUEST_ROOT = "/var/lib/gcvm/packages"  # in every VM: persistent, never /tmp
DIGESTS = ".gcvm-digests"  # in each guest package folder: "sha256  name" per complete file
MANIFEST, PUBLISHED, SEALED, BASELINES, KEY = (
    "manifest.json", "published.safetensors", "master.sealed", "baselines.sealed", "model.key",
)  # fmt: skip
SIGNATURE = "signature.json"  # the owner's signature, where the package has one
BASELINE_MODES = ("tee-only", "plain-offload", "mask-only")
SCHEME_OF = {  # the framework's modes and their schemes (groupcover.modes; a test keeps them equal)
    "groupcover": "groupcover",
    "groupcover-nomask": "groupcover",
    "hardened": "hardened",
    "hardened-nomask": "hardened",
    "groupcover-2w": "groupcover",
    "hardened-2w": "hardened",
}
DEFAULT_SCHEME = "hardened"  # the framework's default (groupcover.package.build.DEFAULT_SCHEME)
SINGLE_RESOURCE = "gcvm/model/key"  # the framework's resource when a master has one package
INSECURE_LABEL = "model key released without attestation"


class PackageError(GcvmError):
    pass


def owner_dir(cluster: str, given: Path | None = None) -> Path:
    """The owner's folder: source checkpoints it names, the key files, the broker's log.
    Default <state root>/owner/<cluster>/ (/var/lib/gcvm/owner/<cluster>/ as root); it is not
    under the cluster's folder, so `gcvm down` leaves the keys where the owner put them."""
    return given if given is not None else paths.state_root() / "owner" / cluster


def key_resource(package_id: str) -> str:
    """The broker resource of one package's key when a master holds several (the framework's
    groupcover.package.runtime.key_resource)."""
    return f"gcvm/{package_id}/key"


# ---- planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProtectPlan:
    model: str
    schemes: tuple[str, ...]  # one package per scheme
    baselines: tuple[bool, ...]  # per package: seal the plaintext baselines
    reference: str  # BxS

    def folder_name(self, index: int) -> str:
        base = "-baselines" if self.baselines[index] else ""
        return f"{self.model}-{self.schemes[index]}{base}-{self.reference}"


def needs_baselines(modes: Sequence[str], audit: bool) -> bool:
    return audit or any(m in BASELINE_MODES for m in modes)


def plan_protect(
    model: str, modes: Sequence[str], audit: bool, batch: int, seq: int
) -> ProtectPlan:
    """One package per scheme the modes name (a baseline-only run: the default scheme's); the
    baselines sealed into every package when the audit runs (it compares each mode's payloads
    with the plaintext weights), else into the first package only when a baseline mode runs."""
    unknown = [m for m in modes if m not in SCHEME_OF and m not in BASELINE_MODES]
    if unknown:
        known = ", ".join((*BASELINE_MODES, *SCHEME_OF))
        raise UsageError(f"unknown mode(s) {', '.join(unknown)}", hint=f"choose from {known}")
    schemes = tuple(sorted({SCHEME_OF[m] for m in modes if m in SCHEME_OF})) or (DEFAULT_SCHEME,)
    baseline_modes = any(m in BASELINE_MODES for m in modes)
    flags = tuple(audit or (baseline_modes and i == 0) for i in range(len(schemes)))
    return ProtectPlan(model, schemes, flags, f"{batch}x{seq}")


# ---- packages on the host -------------------------------------------------------------------


@dataclass(frozen=True)
class HostPackage:
    folder: Path
    key: Path  # stays on the host
    manifest: dict[str, Any] = field(repr=False)
    protect_s: float | None = None  # protected for this run (None: given, or reused)

    @property
    def package_id(self) -> str:
        return str(self.manifest["package_id"])

    @property
    def scheme(self) -> str:
        return str(self.manifest.get("scheme"))

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("modes") or ())

    @property
    def has_baselines(self) -> bool:
        return bool(self.manifest.get("baselines")) and (self.folder / BASELINES).is_file()

    def facts(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "package_id": self.package_id, "scheme": self.scheme,
                "modes": list(self.modes), "baselines": self.has_baselines,
                "protect_s": self.protect_s, "key": str(self.key)}  # fmt: skip


def load_package(folder: Path, key: Path | None = None, protect_s: float | None = None
                 ) -> HostPackage:  # fmt: skip
    """A package folder on the host and its key file (default DIR/model.key)."""
    key = key if key is not None else folder / KEY
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UsageError(f"--model {folder} is not a model package: {exc.strerror or exc}",
                         hint="make one with `gcvm model protect SRC --out DIR`, or give a "
                         "built-in model name") from None  # fmt: skip
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the stack
        raise UsageError(f"{folder / MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or "package_id" not in manifest:
        raise UsageError(f"{folder / MANIFEST} is not a model package's manifest")
    for name in (PUBLISHED, SEALED):
        if not (folder / name).is_file():
            raise UsageError(f"package {folder} has no {name}",
                             hint="copy the whole folder `protect` wrote")  # fmt: skip
    if not key.is_file():
        raise UsageError(f"package {folder}: no model key at {key}",
                         hint="pass --key FILE (the key `protect` wrote; it stays on this "
                         "host, the broker releases it)")  # fmt: skip
    check_private(key)  # the broker would refuse to release a key others can read: say so now
    return HostPackage(folder, key, manifest, protect_s)


def assign_modes(pkgs: Sequence[HostPackage], modes: Sequence[str]) -> dict[str, HostPackage]:
    """Which package runs each mode (the framework's rule: the mode's own scheme first, baseline
    modes from a package sealed with --baselines); a mode none runs is one line with a hint."""
    chosen: dict[str, HostPackage] = {}
    for mode in modes:
        able = [p for p in pkgs if mode in p.modes]
        if mode in BASELINE_MODES:
            able = [p for p in able if p.has_baselines]
        same = [p for p in able if p.scheme == SCHEME_OF.get(mode)]
        if not able:
            what = "; ".join(f"{p.folder} runs {', '.join(p.modes) or 'nothing'}" for p in pkgs)
            hint = ("protect it with --baselines (plaintext weights: benchmarks only)"
                    if mode in BASELINE_MODES
                    else f"protect one with --scheme {SCHEME_OF.get(mode, '?')}")  # fmt: skip
            raise UsageError(f"no package given can run {mode} ({what})", hint=hint)
        chosen[mode] = (same or able)[0]
    return chosen


def framework_python() -> tuple[str, Path]:
    """The checkout's venv interpreter (else gcvm's own) and the checkout itself."""
    from orchestrator import deploy, hostworker

    root = deploy.project_root()
    return hostworker.venv_python(root), root


def protect_argv(python: str, model: str, out: Path, scheme: str, key_out: Path, baselines: bool,
                 reference: str, seed: int | None,
                 sign_key: Path | None = None) -> list[str]:  # fmt: skip
    argv = [python, "-m", "groupcover", "protect", model, "--out", str(out), "--scheme", scheme,
            "--key-out", str(key_out), "--reference", reference]  # fmt: skip
    if sign_key is not None:
        argv += ["--sign-key", str(sign_key)]
    if baselines:
        argv.append("--baselines")
    if seed is not None:
        argv += ["--seed", str(seed)]
    return argv


STANDIN = "minilm-standin"  # the stand-in secret: its checkpoint lives in the owner folder


def owner_checkpoint(python: str, root: Path, owner: Path, timeout: float = 300) -> Path:
    """The stand-in secret's checkpoint in the owner folder, written once (a fresh perturbation
    from the OS CSPRNG) and protected from there: every scheme's package is the same secret
    model, and the owner keeps what `gcvm scan --model` searches the host for."""
    folder = owner / STANDIN
    if (folder / "model.safetensors").is_file():
        return folder
    part = owner / f".{STANDIN}.part"
    shutil.rmtree(part, ignore_errors=True)
    argv = [python, "-m", "groupcover.models.standin", "--out", str(part)]
    console.print(f"[dim]the owner's stand-in secret: {shlex.join(argv)}[/]")
    env = {**os.environ, "PYTHONPATH": str(root)}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        shutil.rmtree(part, ignore_errors=True)
        raise PackageError(f"writing the stand-in secret took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        shutil.rmtree(part, ignore_errors=True)
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise PackageError(f"writing the stand-in secret failed:\n{tail}")
    part.rename(folder)
    console.print(f"stand-in secret model: {folder} (the owner's checkpoint)")
    return folder


def protect_builtin(plan: ProtectPlan, state_dir: Path, owner: Path, seed: int | None = None,
                    timeout: float = 900) -> list[HostPackage]:  # fmt: skip
    """Protect a built-in model on the host, one package per planned scheme (reused when the same
    package and its key are already there). The stand-in secret is protected from its checkpoint
    in the owner folder (`owner_checkpoint`)."""
    python, root = framework_python()
    out_root = state_dir / "packages"
    out_root.mkdir(parents=True, exist_ok=True)
    owner.mkdir(parents=True, exist_ok=True, mode=0o700)
    sign_key = ownerid.ensure(owner).signing_key  # the owner signs every package it protects
    source = plan.model
    if plan.model == STANDIN:
        source = str(owner_checkpoint(python, root, owner))
    pkgs = []
    for i, scheme in enumerate(plan.schemes):
        name = plan.folder_name(i)
        folder, key = out_root / name, owner / f"{name}.key"
        signed = (folder / SIGNATURE).is_file()  # one from before the owner signed: again
        if seed is None and (folder / MANIFEST).is_file() and key.is_file() and signed:
            try:
                pkg = load_package(folder, key)
                console.print(f"package {name}: reusing {folder} ({pkg.package_id[:12]})")
                pkgs.append(pkg)
                continue
            except UsageError:
                pass
        shutil.rmtree(folder, ignore_errors=True)  # a stale one (no key): protect it again
        key.unlink(missing_ok=True)
        argv = protect_argv(python, source, folder, scheme, key, plan.baselines[i],
                            plan.reference, seed, sign_key)  # fmt: skip
        console.print(f"[dim]protect on the host: {shlex.join(argv)}[/]")
        env = {**os.environ, "PYTHONPATH": str(root)}
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            shutil.rmtree(folder, ignore_errors=True)
            raise PackageError(
                f"protecting {plan.model} ({scheme}) took over {timeout:.0f} s"
            ) from None
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            key.unlink(missing_ok=True)
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise PackageError(f"protecting {plan.model} ({scheme}) on the host failed:\n{tail}")
        pkg = load_package(folder, key, round(seconds, 2))
        console.print(f"package {name}: protected in {seconds:.1f} s -> {folder} "
                      f"(key {key})")  # fmt: skip
        pkgs.append(pkg)
    return pkgs


def given_packages(dirs: Sequence[Path], keys: Sequence[Path]) -> list[HostPackage]:
    """Packages the user gave (`--model DIR[,DIR..]`), used as they are."""
    if keys and len(keys) != len(dirs):
        raise UsageError(
            f"{len(dirs)} package(s) but {len(keys)} --key",
            hint="one --key FILE per package, in order (default DIR/model.key)",
        )
    return [load_package(d, keys[i] if keys else None) for i, d in enumerate(dirs)]


# ---- copying into the VMs -------------------------------------------------------------------


def guest_folder(pkg: HostPackage) -> str:
    return f"{GUEST_ROOT}/{pkg.package_id}"


def copy_plan(pkg: HostPackage, role: str, baselines: bool) -> list[str]:
    """The files of `pkg` a VM of `role` gets: a master everything but the key (baselines.sealed
    only when `baselines`; the owner's signature where there is one), a worker the manifest and
    the published weights."""
    if role == "worker":
        return [MANIFEST, PUBLISHED]
    files = [MANIFEST, PUBLISHED, SEALED]
    if baselines and pkg.has_baselines:
        files.append(BASELINES)
    if (pkg.folder / SIGNATURE).is_file():  # a master pinning its owner checks it first
        files.append(SIGNATURE)
    return files


_digest_cache: dict[tuple[str, float, int], str] = {}
_digest_lock = threading.Lock()


def file_digest(path: Path) -> str:
    st = path.stat()
    cache_key = (str(path), st.st_mtime, st.st_size)
    with _digest_lock:
        if cache_key in _digest_cache:
            return _digest_cache[cache_key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    with _digest_lock:
        _digest_cache[cache_key] = h.hexdigest()
    return h.hexdigest()


class CopyTarget(Protocol):
    name: str

    def run(self, argv: list[str], *, timeout: float, check: bool = True) -> Any: ...

    def put(self, local: Path, remote: str,
            progress: Callable[[int, int], None] | None = None) -> None: ...  # fmt: skip


def parse_digests(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        digest, _, name = line.strip().partition("  ")
        if len(digest) == 64 and name:
            found[name] = digest
    return found


def _progress_printer(vm: str, name: str, size: int) -> Callable[[int, int], None]:
    marks = iter((25, 50, 75))
    next_mark = [next(marks, 101)]

    def show(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct >= next_mark[0] and done < total:
            console.print(f"[dim]\\[{vm}] {name}: {pct}% of {size / 2**20:.1f} MiB[/]")
            next_mark[0] = next(marks, 101)

    return show


def copy_to(target: CopyTarget, pkg: HostPackage, files: Sequence[str]) -> dict[str, Any]:
    """Copy `files` of `pkg` into the VM, skipping those whose digest is already there; returns
    what was copied and skipped, bytes and seconds."""
    folder = guest_folder(pkg)
    target.run(["mkdir", "-p", "-m", "0700", folder], timeout=30)
    listed = target.run(["cat", f"{folder}/{DIGESTS}"], timeout=30, check=False)
    there = parse_digests(getattr(listed, "stdout", "") or "") if getattr(listed, "rc", 1) == 0 \
        else {}  # fmt: skip
    copied, skipped, nbytes = [], [], 0
    start = time.monotonic()
    digests = {name: file_digest(pkg.folder / name) for name in files}
    try:
        for name in files:
            if there.get(name) == digests[name]:
                skipped.append(name)
                continue
            local = pkg.folder / name
            size = local.stat().st_size
            t0 = time.monotonic()
            part = f"{folder}/.{name}.part"
            target.put(local, part, progress=_progress_printer(target.name, name, size))
            target.run(["mv", "-f", part, f"{folder}/{name}"], timeout=60)
            there[name] = digests[name]
            lines = "".join(f"{d}  {n}\n" for n, d in sorted(there.items()))
            target.run(["sh", "-c", f"printf %s {shlex.quote(lines)} > {folder}/{DIGESTS}"],
                       timeout=30)  # fmt: skip
            dt = time.monotonic() - t0
            console.print(f"[dim]\\[{target.name}] {name}: {size / 2**20:.1f} MiB in {dt:.1f} s "
                          f"({size / 2**20 / max(dt, 1e-3):.0f} MiB/s)[/]")  # fmt: skip
            copied.append(name)
            nbytes += size
    except BaseException:
        # a half-copied file never stays under a real name; remove the partial one
        target.run(["sh", "-c", f"rm -f {folder}/.*.part"], timeout=30, check=False)
        raise
    return {"vm": target.name, "package_id": pkg.package_id, "copied": copied,
            "skipped": skipped, "bytes": nbytes,
            "seconds": round(time.monotonic() - start, 2)}  # fmt: skip


# ---- the broker -----------------------------------------------------------------------------


def bridge_address(st: Any) -> str:
    """The bridge's host-side address (the cluster network's gateway)."""
    hw = st.worker_host
    if hw is not None:
        return str(hw.address)
    subnet = (st.spec or {}).get("subnet")
    if subnet:
        net = ipaddress.ip_network(subnet, strict=False)
        return str(net.network_address + 1)
    if st.vms:  # the gateway of a VM's /24 (gcvm's own networks are /24s)
        net = ipaddress.ip_network(f"{st.vms[0].address}/24", strict=False)
        return str(net.network_address + 1)
    raise PackageError(f"cluster {st.name}: cannot tell the bridge's host address")


def broker_resources(pkgs: Sequence[HostPackage]) -> dict[str, Path]:
    """What the broker serves: each package's key as gcvm/<package_id>/key, and with a single
    package also as gcvm/model/key (the resource a one-package master asks for)."""
    resources = {key_resource(p.package_id): p.key for p in pkgs}
    if len(pkgs) == 1:
        resources[SINGLE_RESOURCE] = pkgs[0].key
    return resources
