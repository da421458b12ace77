"""`up`, `down` and `status`: the cluster's life, from keys to ready guests and back to nothing.

Every side effect goes through a `Backend` (libvirt, namespaces, the private daemon, disks, SSH,
the wheel build); unit tests run this same flow against a backend whose libvirt and SSH are fakes.
The order of `up` is chosen so that a refusal costs nothing: the spec, the name, the TEE and the
image are checked before anything is created, and everything created afterwards is recorded (in
the state file and in each domain's gcvm metadata) before it exists, so `down` can find it after
a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from orchestrator import deploy, keys, netns, paths, privatelibvirt, state, ui
from orchestrator.errors import (
    ClusterExists,
    GcvmError,
    HypervisorError,
    Interrupted,
    RemoteError,
    Timeout,
)
from orchestrator.hypervisor import DhcpHost, Hypervisor, LibvirtHypervisor
from orchestrator.spec import Accel, ClusterSpec, Tee, VmSpec, plan_vms
from orchestrator.state import ClusterState, VmState

DEFAULT_TIMEOUT = 300.0
R = TypeVar("R")
T = TypeVar("T")

# Read inside each guest once it is up: TEE evidence, then the links (for the NIC's name).
GUEST_FACTS = (
    "dmesg 2>/dev/null | grep -i 'Memory Encryption Features active' | tail -n 1"
    " | sed 's/^/dmesg: /'; "
    'for d in /dev/tdx_guest /dev/sev-guest; do [ -e "$d" ] && echo "device: $d"; done; '
    "ip -o link | sed 's/^/link: /'"
)


class Guest(Protocol):
    """What `up` needs of a connection to a guest (orchestrator.remote.Remote)."""

    name: str

    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        env: dict[str, str] | None = None,
        check: bool = True,
        on_line: Callable[[str], None] | None = None,
    ) -> Any: ...

    def put(self, local: Path, remote: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class HostFacts:
    accel: Accel
    caps: Any  # hostcaps.HostCaps (opaque here; handed to the renderer)
    facts: dict[str, Any]  # what the state records: versions, accel, TEE support


class Backend:
    """The real side effects. Each method is one narrow step of the flow."""

    def open_hypervisor(self, uri: str) -> Hypervisor:
        return LibvirtHypervisor(uri)

    # namespaces and the private daemon
    def create_netns(self, name: str) -> None:
        netns.create(name)

    def delete_netns(self, name: str) -> bool:
        return netns.delete(name)

    def netns_exists(self, name: str) -> bool:
        return netns.exists(name)

    def netns_pids(self, name: str) -> list[int]:
        return netns.pids(name)

    def start_daemon(self, cluster: str, netns_name: str, root: Path) -> dict[str, Any]:
        return privatelibvirt.start(cluster, netns_name, root).to_dict()

    def stop_daemon(self, cluster: str) -> bool:
        return privatelibvirt.stop(cluster)

    def daemon_leftover(self, cluster: str) -> bool:
        return privatelibvirt.run_dir_for(cluster).exists()

    def daemon_alive(self, daemon: dict[str, Any]) -> bool:
        return privatelibvirt.PrivateDaemon.from_dict(daemon).alive()

    # host, image, disks
    def precheck(self, spec: ClusterSpec) -> HostFacts:
        """The host's answer before any daemon runs: QEMU asked directly (no side effect)."""
        from orchestrator import hostcaps

        return _host(spec, hostcaps.probe_qemu(kvm_probe=True), {})

    def host_facts(self, hv: Hypervisor, spec: ClusterSpec) -> HostFacts:
        """The host as the cluster's libvirt sees it (domcapabilities: what the renderer needs)."""
        from orchestrator import hostcaps

        if not isinstance(hv, LibvirtHypervisor):
            raise TypeError("the real backend needs a libvirt connection")
        return _host(spec, hostcaps.probe(hv.conn, kvm_probe=True), hv.versions())

    def find_image(self, image_path: Path | None) -> Any:
        from orchestrator import image

        return image.user_image(image_path) if image_path else image.find_image()

    def create_overlay(self, base: Path, base_format: str, overlay: Path) -> None:
        overlay.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            base_format,
            "-b",
            str(base),
            str(overlay),
        ]
        ui.log.debug("run: %s", " ".join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise HypervisorError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")

    def build_seed(self, vm: VmSpec, authorized_key: str, host_key: keys.KeyPair) -> None:
        from orchestrator import seed

        cfg = seed.SeedConfig(
            hostname=vm.name,
            authorized_keys=[authorized_key],
            host_key_private_pem=host_key.private_openssh,
            host_key_public=host_key.public_openssh,
            address=vm.address,
            prefix=vm.prefix,
            gateway=vm.gateway,
            mac=vm.mac,
            dns=[vm.gateway],
        )
        seed.build_seed_iso(cfg, vm.seed)

    def render_network(self, spec: ClusterSpec, vms: Sequence[VmSpec]) -> str:
        from orchestrator import render

        return render.render_network(spec, list(vms), bridge=bridge_name(spec))

    def render_domain(self, vm: VmSpec, image: Any, host: HostFacts, network: str) -> str:
        from orchestrator import render

        return render.render_domain(vm, render_inputs(image, host, network))

    # guests
    def connect(self, st: ClusterState, vm: VmState, timeout: float) -> Guest:
        from orchestrator.remote import Remote

        return Remote.connect(st, vm, timeout)

    def build_wheel(self, out_dir: Path) -> Path:
        return deploy.build_wheel(out_dir)


def bridge_name(spec: ClusterSpec) -> str:
    """virbr0 inside the cluster's own namespace; on a shared daemon (`--connect`), a name of
    the cluster's own that fits Linux's 15 characters and never meets the `default` network's."""
    if spec.connect is None:
        return "virbr0"
    return "gcvm" + hashlib.sha256(spec.name.encode()).hexdigest()[:8]


def render_inputs(image: Any, host: HostFacts, network: str) -> Any:
    """The renderer's inputs for this image on this host and network."""
    from orchestrator import render

    return render.RenderInputs(
        caps=host.caps,
        accel=host.accel,
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=image.cmdline or render.DEFAULT_CMDLINE,
        network=network,
    )


def _host(spec: ClusterSpec, caps: Any, versions: dict[str, str]) -> HostFacts:
    from orchestrator import hostcaps, tee

    accel = tee.require(spec, caps)
    facts: dict[str, Any] = {
        "accel": str(accel),
        "qemu": hostcaps.fmt_version(caps.qemu_version),
        "libvirt": hostcaps.fmt_version(caps.libvirt_version),
        "emulator": caps.emulator,
        "kvm_usable": caps.kvm_usable,
        "kvm_reason": caps.kvm_reason,
        "tdx": caps.tdx.supported,
        "sev_snp": caps.snp.supported,
        "source": caps.source,
        **{f"libvirt_{k}": v for k, v in versions.items()},
    }
    return HostFacts(accel=accel, caps=caps, facts=facts)


# ---------------------------------------------------------------------------------------------
# helpers


def _parallel(fn: Callable[[T], R], items: Sequence[T], what: str) -> list[R]:
    """fn over items in daemon threads; the first failure is raised as soon as it happens
    (an interrupted `up` does not wait for the other threads: its teardown ends them)."""
    results: dict[int, R] = {}
    errors: list[BaseException] = []
    done = threading.Semaphore(0)

    def body(i: int, item: T) -> None:
        try:
            results[i] = fn(item)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.release()

    for i, item in enumerate(items):
        threading.Thread(target=body, args=(i, item), daemon=True, name=f"{what}-{i}").start()
    for _ in items:
        while not done.acquire(timeout=0.2):
            pass
        if errors:
            raise errors[0]
    return [results[i] for i in range(len(items))]


def serial_tail(path: Path | str, lines: int = 25) -> str:
    path = Path(path)
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no serial log at {path})"
    tail = [line for line in text if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in tail) or f"(the serial log {path} is empty)"


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


# ---------------------------------------------------------------------------------------------
# up


@dataclass
class _Up:
    spec: ClusterSpec
    backend: Backend
    timeout: float
    image_path: Path | None
    st: ClusterState | None = None
    hv: Hypervisor | None = None

    @property
    def dir(self) -> Path:
        return state.cluster_dir(self.spec.name)


def _refuse_existing(spec: ClusterSpec, backend: Backend) -> None:
    hint = f"gcvm down --name {spec.name}"
    if state.exists(spec.name):
        raise ClusterExists(f"cluster {spec.name!r} already exists", hint=hint)
    if spec.connect is None and (
        backend.netns_exists(spec.netns) or backend.daemon_leftover(spec.name)
    ):
        raise ClusterExists(
            f"cluster {spec.name!r} left a namespace or daemon behind", hint=f"{hint} removes it"
        )


def up(
    spec: ClusterSpec,
    *,
    keep_on_failure: bool = False,
    image_path: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    backend: Backend | None = None,
) -> ClusterState:
    """Create the cluster and return its state once every VM is ready with the code installed."""
    spec.validate()
    backend = backend or Backend()
    with state.locked(spec.name), _sigterm_interrupts():
        _refuse_existing(spec, backend)
        run = _Up(spec, backend, timeout, image_path or spec.image)
        started = time.monotonic()
        try:
            st = _up(run)
        except BaseException as exc:
            _fail(run, exc, keep_on_failure)
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted(
                    "interrupted; the cluster was removed"
                    if not keep_on_failure
                    else "interrupted; the cluster was kept"
                ) from None
            raise
        finally:
            if run.hv is not None:
                run.hv.close()
        ui.info(
            f"cluster {spec.name} ready in {time.monotonic() - started:.1f} s ({len(st.vms)} VMs)"
        )
        return st


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a CI job cancelled, `timeout`) cleans up like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(run: _Up, exc: BaseException, keep: bool) -> None:
    ui.log.debug("up failed: %r", exc, exc_info=exc)
    if run.st is None:
        return  # nothing was created
    if keep:
        ui.warn(
            f"kept the failed cluster for inspection; remove it with "
            f"`gcvm down --name {run.spec.name}`"
        )
        return
    if run.hv is not None:
        run.hv.close()
        run.hv = None
    kept = _keep_logs(run.spec.name)
    with ui.step(f"clean up the failed cluster {run.spec.name}"):
        try:
            _teardown(run.spec.name, run.st, run.backend)
        except Exception as cleanup_exc:  # the original failure matters more
            ui.warn(f"cleanup incomplete: {cleanup_exc}; run `gcvm down --name {run.spec.name}`")
    if kept is not None:
        ui.info(f"the debug log and serial consoles of the failed `up` are kept in {kept}")


def _keep_logs(name: str) -> Path | None:
    """Copy the cluster's debug log and serial logs out of the folder teardown removes."""
    cdir = state.cluster_dir(name)
    sources = [p for p in (cdir / "debug.log", cdir / "logs") if p.exists()]
    if not sources:
        return None
    dest = paths.state_root() / "failed" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        if src.is_dir():
            shutil.copytree(src, dest / src.name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest / src.name)
    return dest


def _up(run: _Up) -> ClusterState:
    spec, backend = run.spec, run.backend
    with ui.step("check the host"):
        if spec.connect is not None:
            run.hv = backend.open_hypervisor(spec.connect)
            host = backend.host_facts(run.hv, spec)
        else:
            host = backend.precheck(spec)  # asked again through the private daemon below
    with ui.step("find the guest image"):
        image = backend.find_image(run.image_path)
        ui.info(f"image {image.disk}")
        for tee in spec.tees:
            if tee is not Tee.none and image.tee_guest_support.get(str(tee)) is False:
                raise GcvmError(
                    f"the guest image's kernel ({image.kernel_version}) has no {tee} guest support",
                    hint="use an image whose kernel has it (--image PATH), or --tee none",
                )
    vms = plan_vms(spec, run.dir)
    run.st = _initial_state(spec, vms, image)
    ui.attach_debug_log(run.dir / "debug.log")
    ui.log.debug("up: %s", spec)
    host_keys = _write_keys(run.st, vms)
    state.save(run.st)
    if spec.connect is None:
        with ui.step(f"start a private libvirt in network namespace {spec.netns}"):
            backend.create_netns(spec.netns)
            daemon = backend.start_daemon(spec.name, spec.netns, run.dir / "libvirt")
            run.st = replace(run.st, private_daemon=daemon)
            state.save(run.st)
            run.hv = backend.open_hypervisor(run.st.uri)
            host = backend.host_facts(run.hv, spec)
    assert run.hv is not None
    run.st = replace(run.st, host=host.facts)
    state.save(run.st)
    ui.info(
        f"accelerator {host.accel}; libvirt {host.facts.get('libvirt', '?')}, "
        f"QEMU {host.facts.get('qemu', '?')}"
    )
    _create(run, vms, image, host, host_keys)
    return _ready(run, vms, image)


def _initial_state(spec: ClusterSpec, vms: list[VmSpec], image: Any) -> ClusterState:
    cdir = state.cluster_dir(spec.name)
    own_network = spec.network is None
    uri = spec.connect or privatelibvirt.uri_for(privatelibvirt.run_dir_for(spec.name))
    spec_dict = {
        k: (str(v) if isinstance(v, Path | Tee | Accel) else v) for k, v in asdict(spec).items()
    }
    return ClusterState(
        name=spec.name,
        spec=spec_dict,
        uri=uri,
        netns=spec.netns if spec.connect is None else None,
        network=spec.network_name,
        own_network=own_network,
        client_key=cdir / "ssh" / "id_ed25519",
        known_hosts=cdir / "ssh" / "known_hosts",
        image={
            "disk": str(image.disk),
            "python": image.python,
            "recipe_hash": image.recipe_hash,
            "kernel_version": image.kernel_version,
        },
        vms=[
            VmState(
                name=vm.name,
                role=vm.role.value,
                rank=vm.rank,
                index=vm.index,
                address=vm.address,
                mac=vm.mac,
                tee=vm.tee,
                vcpus=vm.vcpus,
                memory_mib=vm.memory_mib,
                disk=str(vm.disk),
                seed=str(vm.seed),
                serial_log=str(vm.serial_log),
            )
            for vm in vms
        ],
    )


def _write_keys(st: ClusterState, vms: list[VmSpec]) -> dict[str, keys.KeyPair]:
    """The cluster's client key, a host key per VM, and known_hosts pinning them by address."""
    keys.ensure_keypair(st.client_key, comment=f"gcvm-{st.name}")
    host_keys = {vm.name: keys.generate_ed25519(comment=vm.name) for vm in vms}
    keys.write_known_hosts(
        st.known_hosts, {vm.address: host_keys[vm.name].public_openssh for vm in vms}
    )
    return host_keys


def _create(
    run: _Up, vms: list[VmSpec], image: Any, host: HostFacts, host_keys: dict[str, keys.KeyPair]
) -> None:
    spec, backend, hv = run.spec, run.backend, run.hv
    assert hv is not None and run.st is not None
    with ui.step(f"network {run.st.network}"):
        if run.st.own_network:
            hv.define_network(backend.render_network(spec, vms))
        else:
            for vm in vms:
                hv.add_dhcp_host(run.st.network, DhcpHost(vm.mac, vm.name, vm.address))
    with ui.step(f"disks and seeds for {len(vms)} VMs"):
        client_pub = run.st.client_key.with_name(run.st.client_key.name + ".pub").read_text()
        for vm in vms:
            backend.create_overlay(image.disk, image.disk_format, vm.disk)
            backend.build_seed(vm, client_pub.strip(), host_keys[vm.name])
            vm.serial_log.parent.mkdir(parents=True, exist_ok=True)
    with ui.step(f"define and start {', '.join(vm.name for vm in vms)}"):
        network = run.st.network
        _parallel(
            lambda vm: hv.start_domain(backend.render_domain(vm, image, host, network)),
            vms,
            "start",
        )


def _ready(run: _Up, vms: list[VmSpec], image: Any) -> ClusterState:
    assert run.st is not None
    st = run.st
    deadline = time.monotonic() + run.timeout
    wheel_dir = run.dir / "wheels"
    with ui.step("build the project's wheel"):
        wheel = run.backend.build_wheel(wheel_dir)
    with ui.step(
        f"wait for {len(vms)} VMs (SSH with pinned host keys, systemd), install {wheel.name}"
    ):
        ready = _parallel(lambda vm: _vm_ready(run, st, vm, wheel, deadline), st.vms, "ready")
    st = replace(st, vms=ready, phase="ready")
    for vm in st.vms:
        ui.info(
            f"{vm.name}: {vm.address} on {vm.ifname or '?'}, TEE requested {vm.tee}, "
            f"guest reports {vm.tee_verified}"
        )
    state.save(st)
    run.st = st
    return st


def _vm_ready(run: _Up, st: ClusterState, vm: VmState, wheel: Path, deadline: float) -> VmState:
    backend = run.backend

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout("deadline passed")
        return remaining

    start = time.monotonic()
    try:
        guest = backend.connect(st, vm, left())
    except (Timeout, RemoteError) as exc:
        raise Timeout(
            f"{vm.name} ({vm.address}) did not become reachable over SSH within "
            f"{run.timeout:.0f} s: {exc}",
            hint=f"last lines of its serial console ({vm.serial_log}):\n"
            f"{serial_tail(vm.serial_log)}",
        ) from None
    try:
        ui.log.info("%s: SSH up after %.1f s", vm.name, time.monotonic() - start)
        facts = guest.run(["sh", "-c", GUEST_FACTS], timeout=min(60.0, left())).stdout
        ifname, verified, evidence = parse_guest_facts(facts, vm.mac)
        if verified != str(vm.tee):
            raise GcvmError(
                f"{vm.name}: asked for TEE {vm.tee}, the guest reports {verified} ({evidence})",
                hint="the guest is not what was requested; see the serial log",
            )
        python = st.image.get("python", "python3")

        def systemd_up() -> None:
            res = guest.run(
                ["systemctl", "is-system-running", "--wait"], timeout=left(), check=False
            )
            status = (res.stdout.strip().splitlines() or ["?"])[-1]
            if status not in ("running", "degraded"):
                raise RemoteError(
                    f"{vm.name}: systemd reports {status!r} (wanted running or degraded)",
                    hint=f"`gcvm ssh {vm.name} systemctl --failed` shows why",
                )
            ui.log.info("%s: systemd %s after %.1f s", vm.name, status, time.monotonic() - start)

        def install() -> None:
            deploy.install(guest, wheel, python, timeout=min(300.0, left()))
            ui.log.info("%s: code installed after %.1f s", vm.name, time.monotonic() - start)

        # the end of the boot and the install overlap (one SSH connection, two channels)
        _parallel(lambda step: step(), [systemd_up, install], f"{vm.name}-ready")
        ui.log.info(
            "%s: ready after %.1f s, %s on %s", vm.name, time.monotonic() - start, verified, ifname
        )
        return replace(vm, ifname=ifname, tee_verified=verified, tee_evidence=evidence)
    finally:
        guest.close()


# ---------------------------------------------------------------------------------------------
# down


def down(name: str, *, connect: str | None = None, backend: Backend | None = None) -> bool:
    """Remove everything the cluster has (or a crashed `up` left). False: there was nothing."""
    backend = backend or Backend()
    with state.locked(name):
        st: ClusterState | None
        try:
            st = state.load(name)
        except state.ClusterNotFound:
            st = None
        except state.StateCorrupt as exc:
            ui.warn(str(exc))
            st = None
        if st is not None:
            ui.attach_debug_log(st.dir / "debug.log")
        started = time.monotonic()
        with ui.step(f"remove cluster {name}"):
            removed = _teardown(name, st, backend, connect=connect)
        if not removed:
            ui.info(f"nothing to remove: no cluster {name!r} and nothing it left behind")
        else:
            ui.info(f"removed {', '.join(removed)} in {time.monotonic() - started:.1f} s")
        return bool(removed)


def _teardown(
    name: str,
    st: ClusterState | None,
    backend: Backend,
    *,
    connect: str | None = None,
) -> list[str]:
    """Remove domains, network or DHCP entries, daemons, namespace, state folder; returns what
    was there. Works from the state file when there is one, else from what it finds."""
    removed: list[str] = []
    ns = st.netns if st is not None else (None if connect else f"gcvm-{name}")
    private = connect is None and (
        st is None or st.private_daemon is not None or st.netns is not None
    )
    uri = (
        st.uri
        if st is not None
        else (connect or privatelibvirt.uri_for(privatelibvirt.run_dir_for(name)))
    )
    if not private or backend.daemon_leftover(name):
        removed += _remove_from_libvirt(name, st, uri, backend)
    if private:
        if backend.stop_daemon(name):
            removed.append("daemons")
        if ns is not None and backend.netns_exists(ns):
            _kill_all(backend.netns_pids(ns))
            backend.delete_netns(ns)
            removed.append(f"namespace {ns}")
    cdir = state.cluster_dir(name)
    if cdir.exists():
        shutil.rmtree(cdir)
        removed.append(f"{cdir}")
    return removed


def _remove_from_libvirt(
    name: str, st: ClusterState | None, uri: str, backend: Backend
) -> list[str]:
    removed: list[str] = []
    try:
        hv = backend.open_hypervisor(uri)
    except HypervisorError as exc:
        ui.warn(f"libvirt at {uri} is unreachable ({exc}); removing the rest")
        return removed
    with contextlib.closing(hv):
        doms = [d.name for d in hv.cluster_domains(name)]
        gone = _parallel(hv.remove_domain, doms, "remove")
        removed += [f"domain {d}" for d, ok in zip(doms, gone, strict=True) if ok]
        network = st.network if st is not None else f"gcvm-{name}"
        if st is None or st.own_network:
            if hv.remove_network(network):
                removed.append(f"network {network}")
        elif hv.network_exists(network):
            for vm in st.vms:
                hv.remove_dhcp_host(network, DhcpHost(vm.mac, vm.name, vm.address))
            removed.append(f"DHCP entries in {network}")
    return removed


def _kill_all(pids: list[int], timeout: float = 5.0) -> None:
    """SIGKILL what is left in the namespace (guests, dnsmasq) and wait for it to go."""
    own = os.getpid()
    for pid in pids:
        if pid != own:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        privatelibvirt.process_name(p) for p in pids if p != own
    ):
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# status


@dataclass(frozen=True)
class VmStatus:
    vm: VmState
    state: str  # libvirt's view: running, shut off, missing, unknown


@dataclass(frozen=True)
class ClusterStatus:
    state: ClusterState
    daemon: str  # running, dead, external
    vms: list[VmStatus]


def status(name: str, *, backend: Backend | None = None) -> ClusterStatus:
    backend = backend or Backend()
    st = state.load(name)
    daemon = "external"
    if st.private_daemon is not None:
        daemon = "running" if backend.daemon_alive(st.private_daemon) else "dead"
    states: dict[str, str] = {}
    if daemon != "dead":
        try:
            with contextlib.closing(backend.open_hypervisor(st.uri)) as hv:
                states = {d.name: d.state for d in hv.cluster_domains(name)}
        except HypervisorError as exc:
            ui.warn(str(exc))
    rows = [
        VmStatus(vm, states.get(vm.name, "missing" if daemon != "dead" else "unknown"))
        for vm in st.vms
    ]
    return ClusterStatus(st, daemon, rows)


@contextlib.contextmanager
def guest(name: str, node: str, timeout: float = 30.0) -> Iterator[Any]:
    """A connection to one VM of a cluster (for `gcvm ssh NODE CMD`)."""
    from orchestrator.remote import Remote

    st = state.load(name)
    remote = Remote.connect(st, st.vm(node), timeout)
    try:
        yield remote
    finally:
        remote.close()
