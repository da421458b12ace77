"""libvirt XML from typed specs: a pure function of (VmSpec, RenderInputs) through jinja2.

Templates live in `vm_templates/` (one `{% block %}` per concern, device partials, a partial per
TEE's `<launchSecurity>`). Folders in `GCVM_TEMPLATE_PATH` (colon-separated) come first, so a user
can replace any template; the built-in ones stay reachable as `gcvm/NAME`, so an override can
`{% extends "gcvm/domain.xml.j2" %}` and change a single block.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import jinja2
import typer

from orchestrator import hostcaps, tee, ui
from orchestrator.errors import GcvmError, UsageError
from orchestrator.hostcaps import HostCaps, Version
from orchestrator.paths import cluster_dir, images_dir
from orchestrator.spec import (
    FIRST_HOST,
    Accel,
    ClusterSpec,
    Role,
    Tee,
    VmSpec,
    plan_vms,
    stable_uuid,
)

METADATA_NS = "https://gcvm.dev/xmlns/1"
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "vm_templates"
BUILTIN_HOSTS_DIR = TEMPLATES_DIR / "hosts"
DEFAULT_CMDLINE = "root=/dev/vda rw console=ttyS0"
DEFAULT_EMULATOR = "/usr/bin/qemu-system-x86_64"


class TemplateError(GcvmError):
    """A template (built-in or from GCVM_TEMPLATE_PATH) failed to render or gave bad XML."""


@dataclass(frozen=True)
class BuiltinHost:
    """A TEE host's domcapabilities shipped with gcvm, with the facts such a file cannot hold."""

    file: str
    libvirt_version: Version
    qemu_version: Version
    kernel_release: str
    flags: tuple[tuple[str, str], ...]  # sysfs module parameters that are Y on that host

    def caps(self) -> HostCaps:
        text = (BUILTIN_HOSTS_DIR / self.file).read_text()
        return HostCaps.from_domcaps_xml(
            text,
            source=f"built-in {self.file} (a typical host of that kind, not this machine)",
            libvirt_version=self.libvirt_version,
            qemu_version=self.qemu_version,
            kernel_release=self.kernel_release,
            sysfs=hostcaps.Sysfs(known=self.flags),
            kvm=hostcaps.KvmProbe(True, "a TEE host's KVM (built-in host, not probed)"),
        )


BUILTIN_HOSTS: dict[Tee, BuiltinHost] = {
    Tee.tdx: BuiltinHost(
        "tdx-host.domcaps.xml", (11, 10, 0), (10, 1, 0), "6.17.0", (("kvm_intel", "tdx"),)
    ),
    Tee.sev_snp: BuiltinHost(
        "sev-snp-host.domcaps.xml", (10, 10, 0), (9, 2, 0), "6.12.0", (("kvm_amd", "sev_snp"),)
    ),
}


@dataclass(frozen=True)
class RenderInputs:
    caps: HostCaps  # live caps, or captured domcapabilities (HostCaps.from_domcaps_xml)
    accel: Accel  # resolved: kvm or tcg (tee.require gives it)
    kernel: Path | None  # None: the disk boots itself (a user's own image)
    initrd: Path | None
    cmdline: str = DEFAULT_CMDLINE
    network: str = "default"
    emulator: str | None = None  # None: the caps' emulator
    firmware: Path | None = None  # None: the caps' firmware for the VM's TEE
    options: tee.TeeOptions = field(default_factory=tee.TeeOptions)
    # "user:group" QEMU runs as, through a static DAC <seclabel> (shared daemons); None: the
    # daemon's qemu.conf decides (a private daemon's names an unprivileged user)
    run_as: str | None = None
    # the root disk is attached read-only: gcvm's image, whose root is checked by dm-verity and
    # whose writable state lives in a tmpfs (a write to the disk would only break verification)
    root_readonly: bool = False
    # a locked master's framework code (orchestrator.codedisk), attached read-only, serial
    # gcvm-code; None for every other VM
    code_disk: Path | None = None

    def __post_init__(self) -> None:
        if self.accel is Accel.auto:
            raise ValueError("RenderInputs.accel must be resolved (kvm or tcg), not auto")


class ClusterTag(NamedTuple):
    """gcvm's tag in a domain's <metadata>: unpacks as (cluster, role, rank); also reads as a
    mapping (`dict(tag)`, `tag["cluster"]`)."""

    cluster: str
    role: str
    rank: int

    def keys(self) -> tuple[str, ...]:
        return self._fields

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)


# --------------------------------------------------------------------------------------------
# Templates


def template_dirs() -> list[Path]:
    user = [Path(p) for p in os.environ.get("GCVM_TEMPLATE_PATH", "").split(os.pathsep) if p]
    return [*user, TEMPLATES_DIR]


def environment() -> jinja2.Environment:
    builtin = jinja2.FileSystemLoader(str(TEMPLATES_DIR))
    loader = jinja2.ChoiceLoader(
        [
            jinja2.FileSystemLoader([str(p) for p in template_dirs()]),
            jinja2.PrefixLoader({"gcvm": builtin}),
        ]
    )
    return jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _render(template: str, **context: Any) -> str:
    try:
        text = environment().get_template(template).render(**context)
    except jinja2.TemplateError as exc:
        raise TemplateError(
            f"template {template} failed: {exc}",
            hint=f"template folders, first match wins: {', '.join(map(str, template_dirs()))}",
        ) from None
    try:
        ET.fromstring(text)
    except ET.ParseError as exc:
        raise TemplateError(f"template {template} gave malformed XML: {exc}") from None
    return text


# --------------------------------------------------------------------------------------------
# Domains and networks


def render_domain(vm: VmSpec, inputs: RenderInputs) -> str:
    """The domain XML of one VM. Pure: the same inputs give the same bytes."""
    backend = tee.backend(vm.tee)
    shape = backend.shape(inputs.caps, inputs.accel, inputs.firmware, inputs.options)
    return _render(
        "domain.xml.j2",
        vm=vm,
        shape=shape,
        kernel=inputs.kernel,
        initrd=inputs.initrd,
        cmdline=inputs.cmdline,
        network=inputs.network,
        emulator=inputs.emulator or inputs.caps.emulator or DEFAULT_EMULATOR,
        metadata_ns=METADATA_NS,
        run_as=inputs.run_as,
        root_readonly=inputs.root_readonly,
        code_disk=inputs.code_disk,
    )


def render_network(spec: ClusterSpec, vms: list[VmSpec], bridge: str = "virbr0") -> str:
    """NAT network on `bridge` with the gateway address, a DHCP range after the VMs' addresses
    and one static lease per VM."""
    net = spec.ipv4
    first_free = net.network_address + FIRST_HOST + len(vms)
    last = net.broadcast_address - 1
    return _render(
        "network.xml.j2",
        name=spec.network_name,
        uuid=stable_uuid("gcvm-network", spec.name, spec.network_name),
        bridge=bridge,
        gateway=spec.gateway,
        netmask=str(net.netmask),
        range_start=str(min(first_free, last)),
        range_end=str(last),
        vms=vms,
    )


def parse_metadata(xml: str) -> ClusterTag | None:
    """gcvm's (cluster, role, rank) from a domain's XML; None for a domain gcvm did not make."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    node = root.find(f"metadata/{{{METADATA_NS}}}cluster")
    if node is None:
        return None
    try:
        return ClusterTag(
            node.attrib["name"], Role(node.attrib["role"]).value, int(node.attrib["rank"])
        )
    except (KeyError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# gcvm render


@dataclass(frozen=True)
class Rendered:
    out_dir: Path
    domains: tuple[Path, ...]
    network: Path
    caps_source: str
    accel: Accel


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    cmdline: str
    built: bool  # False: the paths are where `gcvm image build` will put them


def guest_boot_files() -> BootFiles:
    """The built guest image's kernel, initrd and command line; without a built image, the
    paths under the image cache where `gcvm image build` puts them (rendering never needs
    the files to exist)."""
    from orchestrator import image

    try:
        found = image.find_image()
        if found.kernel is not None and found.initrd is not None:
            return BootFiles(found.kernel, found.initrd, found.cmdline, True)
    except GcvmError:
        pass
    try:
        folder = images_dir() / image.recipe_hash()
    except (GcvmError, OSError):
        folder = images_dir() / "not-built"
    return BootFiles(folder / image.KERNEL, folder / image.INITRD, image.CMDLINE, False)


def caps_for_render(spec: ClusterSpec, host_caps: Path | None, connect: str | None) -> HostCaps:
    if host_caps is not None:
        return HostCaps.from_file(host_caps)
    tees = [t for t in spec.tees if t is not Tee.none]
    if tees:
        return BUILTIN_HOSTS[tees[0]].caps()
    return hostcaps.detect(connect)


def locked_inputs(vm: VmSpec, inputs: RenderInputs, code: Any) -> RenderInputs:
    """A locked master's inputs: its code disk (`orchestrator.codedisk.CodeDisk`) attached, and
    `gcvm.locked=1` with the disk's root hash appended to the command line its launch measures."""
    if not vm.locked:
        return inputs
    from orchestrator.image.model import guest_cmdline

    return replace(inputs, cmdline=guest_cmdline(inputs.cmdline, code.cmdline()),
                   code_disk=code.path)  # fmt: skip


def render_cluster(spec: ClusterSpec, inputs: RenderInputs, out_dir: Path,
                   code: Any = None) -> Rendered:  # fmt: skip
    """Write every domain's XML and the network's into `out_dir`; touches no VM. `code`: the
    locked masters' code disk (a TEE cluster's masters are locked), moved into `out_dir`."""
    vms = plan_vms(spec, cluster_dir(spec.name))
    inputs_net = replace(inputs, network=spec.network_name)
    placed = replace(code, path=out_dir / "code.img") if code is not None else None
    # everything is rendered before anything is written: a refusal leaves no --out behind
    texts = {f"{vm.name}.xml": render_domain(vm, locked_inputs(vm, inputs_net, placed)
                                             if placed is not None else inputs_net)
             for vm in vms}  # fmt: skip
    texts["network.xml"] = render_network(spec, vms)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for file_name, text in texts.items():
            (out_dir / file_name).write_text(text)
        if code is not None and placed is not None:
            shutil.move(str(code.path), placed.path)
    except OSError as exc:
        raise UsageError(
            f"cannot write --out {out_dir}: {exc.strerror or exc}",
            hint="choose a folder you can write to",
        ) from None
    domains = tuple(out_dir / f"{vm.name}.xml" for vm in vms)
    return Rendered(out_dir, domains, out_dir / "network.xml", inputs.caps.source, inputs.accel)


__all__ = [
    "BUILTIN_HOSTS",
    "DEFAULT_CMDLINE",
    "METADATA_NS",
    "ClusterTag",
    "RenderInputs",
    "Rendered",
    "caps_for_render",
    "environment",
    "guest_boot_files",
    "parse_metadata",
    "render_cluster",
    "render_domain",
    "render_network",
]


def render_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the XML files.")],
    tee_: Annotated[Tee, typer.Option("--tee", help="TEE of every VM.")] = Tee.none,
    workers: Annotated[int, typer.Option("--workers", help="Worker VMs.")] = 1,
    masters: Annotated[int, typer.Option("--masters", help="Master VMs.")] = 1,
    worker_tee: Annotated[
        Tee | None, typer.Option("--worker-tee", help="TEE of the workers (default: --tee).")
    ] = None,
    host_caps: Annotated[
        Path | None,
        typer.Option(
            "--host-caps",
            help="A captured `virsh domcapabilities` of the target host (default: "
            "this host for --tee none, a built-in TDX/SNP host otherwise).",
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Cluster name.")] = "gcvm",
    vcpus: Annotated[int, typer.Option("--vcpus", help="vCPUs per VM.")] = 1,
    memory: Annotated[int, typer.Option("--memory", help="Memory per VM in MiB.")] = 2048,
    accel: Annotated[
        Accel,
        typer.Option("--accel", help="kvm, tcg, or auto (kvm when it really runs a guest here)."),
    ] = Accel.auto,
    subnet: Annotated[
        str | None,
        typer.Option("--subnet", help="The cluster network (default: the name's own /24)."),
    ] = None,
    connect: Annotated[
        str | None,
        typer.Option(
            "--connect",
            help="libvirt URI to ask for this host's facts (--tee none without --host-caps).",
        ),
    ] = None,
    cmdline: Annotated[
        str | None,
        typer.Option("--cmdline", help="Guest kernel command line (default: the image's)."),
    ] = None,
    runtime: Annotated[
        str, typer.Option("--runtime", help="vms: libvirt XML; pods: Kubernetes YAML.")
    ] = "vms",
    target: Annotated[
        str, typer.Option("--target", help="--runtime pods: k8s or podman (podman kube play).")
    ] = "k8s",
    worker_gpu: Annotated[
        bool, typer.Option("--worker-gpu", help="--runtime pods: one GPU per worker pod.")
    ] = False,
    coco_dev: Annotated[
        bool,
        typer.Option(
            "--coco-dev",
            help="--runtime pods --tee none: the CoCo runtime without a "
            "hardware TEE (kata-qemu-coco-dev).",
        ),
    ] = False,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker", help="--runtime pods: the key broker (KBS) URL in the masters' initdata."
        ),
    ] = None,
    owner: Annotated[
        Path | None,
        typer.Option(
            "--owner",
            help="--runtime pods: the owner folder whose pins go into the "
            "masters' initdata (made on first use).",
        ),
    ] = None,
    pod_image: Annotated[
        str | None,
        typer.Option(
            "--image",
            help="--runtime pods: the container image (default: the one "
            "`gcvm up --runtime pods` makes from the guest image).",
        ),
    ] = None,
) -> None:
    """Write a cluster's libvirt XML (domains, network) or, with --runtime pods, its Kubernetes
    manifests, without touching a VM or a pod."""
    if runtime not in ("vms", "pods"):
        raise UsageError(f"unknown --runtime {runtime!r}", hint="choose vms or pods")
    if runtime == "pods":
        # only this path needs the pods modules
        from orchestrator import ownerid, pods  # noqa: F401
        from orchestrator.pods.manifests import PodsSpec, Target
        from orchestrator.pods.render_cmd import default_image, render_pods

        if target not in ("k8s", "podman"):
            raise UsageError(f"unknown --target {target!r}", hint="choose k8s or podman")
        pods_spec = PodsSpec(
            name=name, tee=tee_, masters=masters, workers=workers, worker_gpu=worker_gpu,
            target=Target(target), coco_dev=coco_dev, broker=broker,
            owner=ownerid.ensure(owner.resolve()) if owner else None,
            image=pod_image or default_image(), subnet=subnet, vcpus=vcpus, memory_mib=memory,
        )  # fmt: skip
        render_pods(pods_spec, out)
        return
    vm_only = {"--target": target != "k8s", "--worker-gpu": worker_gpu, "--coco-dev": coco_dev,
               "--broker": broker, "--owner": owner, "--image": pod_image}  # fmt: skip
    for flag, given in vm_only.items():
        if given:
            raise UsageError(f"{flag} is for --runtime pods", hint="add --runtime pods")
    spec = ClusterSpec(
        name=name,
        tee=tee_,
        worker_tee=worker_tee,
        accel=accel,
        masters=masters,
        workers=workers,
        vcpus=vcpus,
        memory_mib=memory,
        subnet=subnet,
    )
    caps = caps_for_render(spec, host_caps, connect)
    resolved = render_accel(spec, caps)
    boot = guest_boot_files()
    inputs = RenderInputs(
        caps=caps,
        accel=resolved,
        kernel=boot.kernel,
        initrd=boot.initrd,
        cmdline=cmdline or boot.cmdline,
        network=spec.network_name,
    )
    with tempfile.TemporaryDirectory(prefix="gcvm-render-") as tmp:
        code = None
        if spec.locked_masters:  # as `gcvm up` attaches it: the checkout's framework
            from orchestrator import codedisk, deploy

            code = codedisk.build(Path(tmp) / "code.img", deploy.project_root())
        done = render_cluster(spec, inputs, out, code)
    if code is not None:
        ui.info(f"locked masters: code disk {out / 'code.img'}, dm-verity root hash "
                f"{code.root_hash} (in their command line)")  # fmt: skip
    ui.info(f"host facts: {caps.source}")
    ui.info(f"accelerator: {resolved}")
    if not boot.built:
        ui.info(
            f"no guest image built yet: kernel and initrd paths point where "
            f"`gcvm image build` puts them ({boot.kernel.parent})"
        )
    for path in (*done.domains, done.network):
        ui.out.print(str(path))


def render_accel(spec: ClusterSpec, caps: HostCaps) -> Accel:
    """TDX/SNP domains are KVM domains; a no-TEE cluster resolves auto against the caps."""
    if any(t is not Tee.none for t in spec.tees):
        if spec.accel is Accel.tcg:
            raise UsageError(
                "--accel tcg cannot run a TEE guest", hint="leave out --accel, or use --tee none"
            )
        return Accel.kvm
    return tee.resolve_accel(spec.accel, caps)
