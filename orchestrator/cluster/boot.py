"""`up`: refuse before creating, create, wait; on failure or Ctrl-C, remove what was made."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator import paths, state, ui
from orchestrator.cluster.addressing import allocation_lock, resolve_subnet
from orchestrator.cluster.backend import Backend
from orchestrator.cluster.create import _create, _initial_state, _Up, _write_keys
from orchestrator.cluster.ready import _ready
from orchestrator.cluster.teardown import _teardown
from orchestrator.errors import (
    ClusterExists,
    GcvmError,
    Interrupted,
    UsageError,
)
from orchestrator.image.model import verity_root
from orchestrator.spec import ClusterSpec, Tee, check_timeout, plan_vms
from orchestrator.state import ClusterState

DEFAULT_TIMEOUT = 300.0


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
    check_timeout("--timeout", timeout)
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
        if spec.locked_masters:
            ui.info("masters locked: no SSH, the framework from their measured code disk; runs go "
                    "through each master's job agent")  # fmt: skip
        else:
            ui.info("masters unlocked (--tee none, for development): SSH and `gcvm push` reach "
                    "them; --locked locks them as a TEE cluster's are")  # fmt: skip
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


_WAIT_FOR_CLEANUP = "cleaning up; wait for it to finish (it stops by itself)"


@contextlib.contextmanager
def _shielded() -> Iterator[list[int]]:
    """Cleanup runs to its end: Ctrl-C and SIGTERM are noted and said to wait, not raised.
    Yields the signals that arrived meanwhile."""
    arrived: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield arrived
        return

    def note(signum: int, frame: object) -> None:
        # the handler may run inside a write of the log or the console (interrupted there):
        # nothing buffered here, or that writer is re-entered; the log hears of it afterwards
        arrived.append(signum)
        with contextlib.suppress(OSError):
            os.write(2, f"warning: {_WAIT_FOR_CLEANUP}\n".encode())

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield arrived
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            ui.log.warning("%s (%d signal(s) during the cleanup)", _WAIT_FOR_CLEANUP, len(arrived))


def _fail(run: _Up, exc: BaseException, keep: bool) -> None:
    with _shielded():
        _fail_shielded(run, exc, keep)


def _fail_shielded(run: _Up, exc: BaseException, keep: bool) -> None:
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
        with contextlib.suppress(Exception):
            run.hv.close()
        run.hv = None
    kept = _keep_logs(run.spec.name)
    with ui.step(f"clean up the failed cluster {run.spec.name}"):
        try:
            _teardown(run.spec.name, run.st, run.backend)
        except BaseException as cleanup_exc:  # the original failure matters more
            ui.warn(
                f"cleanup incomplete: {cleanup_exc or type(cleanup_exc).__name__}; "
                f"run `gcvm down --name {run.spec.name}`"
            )
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
    # a user's --image is checked first: a wrong file is theirs to fix, whatever the host
    given = backend.find_image(run.image_path) if run.image_path is not None else None
    if given is not None:
        _check_lockable(spec, given)
    with ui.step("check the host"):
        if spec.connect is not None:
            run.hv = backend.open_hypervisor(spec.connect)
            host = backend.host_facts(run.hv, spec)
        else:
            host = backend.precheck(spec)  # asked again through the private daemon below
    with ui.step("find the guest image"):
        image = given if given is not None else backend.find_image(run.image_path)
        ui.info(f"image {image.disk}")
        if given is None:  # a given image was checked first, above
            _check_lockable(spec, image)
        for tee in spec.tees:
            if tee is not Tee.none and image.tee_guest_support.get(str(tee)) is False:
                raise GcvmError(
                    f"the guest image's kernel ({image.kernel_version}) has no {tee} guest support",
                    hint="use an image whose kernel has it (--image PATH), or --tee none",
                )
    # chosen and recorded under one host-wide lock: two `up`s at once never pick the same
    with allocation_lock(), ui.step("choose the cluster's subnet"):
        spec = run.spec = resolve_subnet(spec, run.hv, backend)
        ui.info(f"subnet {spec.subnet}")
        vms = plan_vms(spec, run.dir)
        run.st = _initial_state(spec, vms, image)
        state.save(run.st)
    ui.attach_debug_log(run.dir / "debug.log")
    ui.log.debug("up: %s", spec)
    host_keys = _write_keys(run.st, vms)
    run.st = replace(run.st, trust=_owner_identity(spec).facts())
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
    if spec.worker_host:
        _start_host_worker(run)  # probes its device while the VMs boot
    if spec.broker:
        _start_broker(run)
    return _ready(run, vms, image)


def _check_lockable(spec: ClusterSpec, image: Any) -> None:
    if spec.locked_masters and not verity_root(image):
        raise UsageError(
            "locked masters boot gcvm's own image (its root and code disk under dm-verity, sshd "
            f"off and the job agent on when the measured command line says so); {image.disk} "
            "is not one",
            hint="leave out --image (gcvm image build makes it), or leave out --locked",
        )


def _owner_identity(spec: ClusterSpec) -> Any:
    """The owner's identities (made on first use in the owner folder), pinned in every guest's
    kernel command line: its masters trust that broker and that package signer only."""
    from orchestrator import ownerid
    from orchestrator.packages import owner_dir

    with ui.step("the owner's identities (broker certificate, package-signing key)"):
        ident = ownerid.ensure(owner_dir(spec.name, Path(spec.owner) if spec.owner else None))
        facts = ident.facts()
        ui.info(f"owner folder {ident.folder}: broker certificate sha256 "
                f"{facts['broker_cert_sha256'][:16]}..., package signer {facts['owner_key']}; "
                "both pinned in the guests' kernel command line")  # fmt: skip
    return ident


def _start_broker(run: _Up) -> None:
    """The owner's key broker for the cluster's lifetime, on the bridge's host-side address in
    the cluster's namespace; recorded before it starts, so a failure from here on stops it."""
    from orchestrator import clusterbroker
    from orchestrator.packages import owner_dir

    assert run.st is not None
    spec = run.spec
    owner = Path((run.st.trust or {}).get("owner") or owner_dir(spec.name))

    def record(b: clusterbroker.ClusterBrokerState) -> None:
        assert run.st is not None
        run.st = replace(run.st, broker=b.to_dict())
        state.save(run.st)

    broker = clusterbroker.for_owner(owner, spec.gateway, run.st.netns, spec.broker_policy)
    clusterbroker.start_recorded(broker, record)


def _start_host_worker(run: _Up) -> None:
    """The worker as a process on the host, bound to the bridge's host-side address, inside the
    cluster's namespace; recorded before it starts, so a failure from here on stops it."""
    import os

    from orchestrator import deploy, hostworker
    from orchestrator.cluster.backend import bridge_name

    assert run.st is not None
    spec, cdir = run.spec, run.dir
    root = deploy.project_root()
    hw = hostworker.HostWorkerState(
        name=f"{spec.name}-{hostworker.NAME}",
        rank=spec.masters,
        address=spec.gateway,
        ifname=bridge_name(spec),
        python=hostworker.venv_python(root),
        root=str(root),
        threads=spec.host_threads(os.cpu_count() or 1),
        dir=str(cdir / hostworker.NAME),
        log=str(cdir / "logs" / f"{hostworker.NAME}.log"),
        netns=run.st.netns,
    )
    run.st = replace(run.st, host_worker=hw.to_dict())
    state.save(run.st)
    with ui.step(f"start the host worker on {hw.ifname} {hw.address} ({hw.python})"):
        hw = run.backend.start_host_worker(hw)
        run.st = replace(run.st, host_worker=hw.to_dict())
        state.save(run.st)
        ui.info(
            f"host worker: pid {hw.pid}, {hw.device} ({hw.device_name}), torch {hw.torch}"
            + (f", {hw.threads} CPU threads" if hw.device == "cpu" else "")
        )
