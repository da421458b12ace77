"""The `gcvm` command line. The only place that turns a GcvmError into a message and exit code."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import typer

from orchestrator.errors import GcvmError
from orchestrator.run.settings import options_of
from orchestrator.ui import console, log

app = typer.Typer(
    name="gcvm",
    help="Run GroupCover secure inference on confidential VMs (TDX, SEV-SNP, or plain KVM/TCG).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Commands are registered below, one module per concern.

# --- gcvm image: the guest image ---------------------------------------------------------------
image_app = typer.Typer(help="Build and inspect the guest image.", no_args_is_help=True)
app.add_typer(image_app, name="image")


@image_app.command("build")
def image_build(
    force: bool = typer.Option(False, "--force", help="Rebuild even if the image is cached."),
) -> None:
    """Build the Debian guest image for the current recipe (cached by recipe hash)."""
    from orchestrator.image import build_image, describe_image

    describe_image(build_image(force=force))


@image_app.command("info")
def image_info() -> None:
    """Show the cached image for the current recipe (or why there is none)."""
    from orchestrator.image import describe_image, find_image

    describe_image(find_image())


# --- gcvm run: the framework's ranks across the cluster ------------------------------------
run_app = typer.Typer(
    help="Run GroupCover (or the seed's scripts) across the cluster's VMs.", no_args_is_help=True
)
app.add_typer(run_app, name="run")


@app.command("push")
def push_cmd(name: str = typer.Option("gcvm", "--name", help="Cluster name.")) -> None:
    """Rebuild the project's wheel and install it into every VM of a running cluster."""
    from orchestrator import deploy

    deploy.push(name)


@run_app.command("bench")
@options_of("name", "model", "keys", "owner", "policy", "modes", "batch", "seq", "repeat",
            "warmup", "seed", "audit", "verify", "port", "masters", "transport_micro", "timeout",
            "rpc_timeout", "out")  # fmt: skip
def run_bench_cmd(**options: Any) -> None:
    """Benchmark the modes side by side across the VMs; print a table, write JSON and a chart."""
    from orchestrator.run.settings import BenchSettings

    settings = BenchSettings.from_options(options)
    from orchestrator.pods import lifecycle

    if lifecycle.is_pods(options["name"]):
        from orchestrator.pods.bench import run_bench as run_bench_pods
        from orchestrator.pods.micro import run_transport_micro as micro_pods

        (micro_pods if options["transport_micro"] else run_bench_pods)(
            options["name"], settings, options["out"]
        )
        return
    if options["transport_micro"]:
        from orchestrator.run.micro import run_transport_micro

        run_transport_micro(options["name"], settings, options["out"])
        return
    from orchestrator.run.bench import run_bench

    run_bench(options["name"], settings, options["out"])


@run_app.command(
    "exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
@options_of("name", "role", "port", "timeout",
            port={"help": "MASTER_PORT for the ranks."},
            timeout={"help": "Seconds before the command is stopped."})  # fmt: skip
def run_exec_cmd(ctx: typer.Context, **options: Any) -> None:
    """Run `-- CMD ARGS...` on the VMs with each rank's seed variables set.

    RANK, WORLD_SIZE, WORKER (masters), MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME,
    TP_SOCKET_IFNAME and GCVM_ROLE (master or worker) come from the cluster's state.
    """
    from orchestrator.errors import UsageError
    from orchestrator.run.exec import run_exec
    from orchestrator.spec import Role

    role = options["role"]
    if role not in ("all", "master", "worker"):
        raise UsageError(f"unknown --role {role!r}", hint="use all, master or worker")
    argv = list(ctx.args)
    roles = [Role.master, Role.worker] if role == "all" else [Role(role)]
    run_exec(options["name"], {r: argv for r in roles}, port=options["port"],
             timeout=options["timeout"])  # fmt: skip


@run_app.command("seed")
@options_of(
    "name", "variables", "port", "timeout", "model", "keys", "owner", "policy", "verify",
    port={"help": "MASTER_PORT for the ranks."},
    timeout={"help": "Seconds before the scripts are stopped."},
    model={"default": "seed-transformer", "decls": ("--model",),
           "help": "A built-in model (protected on the host into packages) or package folders "
           "DIR[,DIR...] from `gcvm model protect`; the scripts run it from its packages."},
    keys={"type": list[str],
          "help": "A given package's model key (default DIR/model.key); repeatable."},
    owner={"type": str | None,
           "help": "The owner folder for keys made here and the broker's log."},
    policy={"type": str | None},
)  # fmt: skip
def run_seed_cmd(**options: Any) -> None:
    """Run the seed's tee_test_transformer_{worker,master}.py with the seed's variables, the
    model coming as packages released by the run's key broker."""
    from orchestrator.errors import UsageError
    from orchestrator.run.exec import SEED_COMMANDS, SEED_ENV, run_exec, seed_package_settings

    extra = {}
    for item in options["variables"]:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(
                f"--set {item!r} is not KEY=VALUE", hint="e.g. --set MODES=plain-offload"
            )
        extra[key] = value
    # between machines every transport runs over TCP (TensorPipe's shared memory is useless
    # across them): the seed's scripts read FORCE_TCP
    packages_for = seed_package_settings(options["model"], extra, tuple(options["keys"]),
                                         options["owner"], options["policy"])  # fmt: skip
    # the scripts check every result unless VERIFY=0: the choice is written either way
    checked = {"VERIFY": "1" if options["verify"] else "0"}
    run_exec(options["name"], SEED_COMMANDS, port=options["port"], timeout=options["timeout"],
             extra_env={**SEED_ENV, **checked, **extra}, packages_for=packages_for)  # fmt: skip


# --- gcvm up / down / status / ssh / logs: the cluster's life ------------------------------
E = TypeVar("E", bound=StrEnum)


def _choice(enum: type[E], flag: str, value: str) -> E:
    from orchestrator.errors import UsageError

    try:
        return enum(value)
    except ValueError:
        raise UsageError(
            f"unknown {flag} {value!r}", hint=f"choose one of {', '.join(e.value for e in enum)}"
        ) from None


@app.command("up")
def up_cmd(
    tee: str = typer.Option(
        "none",
        help="TEE of the masters (and of the workers unless --worker-tee): none, tdx or sev-snp.",
    ),
    workers: int | None = typer.Option(
        None, help="Number of worker VMs (default 1; not with --worker host)."
    ),
    masters: int = typer.Option(1, help="Number of master VMs."),
    worker: str = typer.Option(
        "vm",
        "--worker",
        help="vm: the workers are VMs; host: one worker process on this host (its GPU when "
        "present, else its CPU threads), bound to the cluster bridge, serving every master.",
    ),
    worker_threads: int | None = typer.Option(
        None,
        help="--worker host: its CPU threads (default: the host's CPUs less the masters' vCPUs).",
    ),
    worker_tee: str | None = typer.Option(None, help="TEE of the workers (default: --tee)."),
    name: str = typer.Option("gcvm", "--name", help="Cluster name."),
    accel: str = typer.Option("auto", help="auto, kvm or tcg (auto: KVM when it works)."),
    connect: str | None = typer.Option(
        None, help="Use this libvirt daemon (e.g. qemu:///system) instead of a private one."
    ),
    network: str | None = typer.Option(
        None,
        help="With --connect: an existing libvirt network "
        "to add the VMs to (default: a network of their own).",
    ),
    image: Path | None = typer.Option(
        None, help="A disk image of your own (default: gcvm's built image)."
    ),
    subnet: str | None = typer.Option(
        None,
        help="IPv4 subnet of the cluster's own network (default: a free /24 of "
        "192.168.128.0/17; one that collides with a route, bridge or network is refused).",
    ),
    vcpus: int = typer.Option(1, help="vCPUs per VM."),
    memory: int = typer.Option(2048, help="Memory per VM in MiB."),
    broker: bool = typer.Option(
        False,
        "--broker",
        help="Start the owner's key broker for the cluster's lifetime (on the bridge, in the "
        "cluster's namespace); `run bench|seed` release the model keys through it.",
    ),
    policy: str | None = typer.Option(
        None, "--policy", help="--broker: its policy file (needed with --tee tdx or sev-snp)."
    ),
    owner: Path | None = typer.Option(
        None,
        "--owner",
        help="The owner folder: the broker's identity and the package-signing key, pinned in "
        "every guest's kernel command line (made on first use; default "
        "/var/lib/gcvm/owner/<name>/). In production it is the owner's machine's.",
    ),
    locked: bool = typer.Option(
        False,
        "--locked",
        help="Lock the masters as under a TEE (always so with --tee tdx|sev-snp): no SSH, the "
        "framework only from a dm-verity code disk measured in the kernel command line, runs "
        "only through the master's job agent. With --tee none: the same behaviour, unmeasured.",
    ),
    keep_on_failure: bool = typer.Option(False, help="Keep what was created if `up` fails."),
    timeout: float = typer.Option(300.0, help="Seconds for the VMs to become ready."),
    runtime: str = typer.Option(
        "vms",
        "--runtime",
        help="vms: libvirt VMs; pods: one podman pod per rank in the cluster's namespace "
        "(--tee none; TEE pods need Kubernetes: --kube-context).",
    ),
    kube_context: str | None = typer.Option(
        None,
        "--kube-context",
        help="--runtime pods: apply the manifests to this kubeconfig "
        "context with kubectl (a real Kubernetes cluster) instead of running podman here.",
    ),
    kbs: str | None = typer.Option(
        None,
        "--kbs",
        help="--kube-context: the key broker (KBS) URL in the masters' "
        "initdata (needed with --tee tdx|sev-snp).",
    ),
) -> None:
    """Create a cluster: masters and workers on one private network, ready for `gcvm run`."""
    from orchestrator import cluster
    from orchestrator.errors import UsageError
    from orchestrator.spec import Accel, ClusterSpec, Tee

    if runtime not in ("vms", "pods"):
        raise UsageError(f"unknown --runtime {runtime!r}", hint="choose vms or pods")
    if runtime == "pods":
        from orchestrator.pods.up_cmd import up_pods

        up_pods(name, _choice(Tee, "--tee", tee), masters, 1 if workers is None else workers,
                worker, subnet, vcpus, memory, keep_on_failure, timeout, broker, policy,
                owner.resolve() if owner else None, kube_context, kbs)  # fmt: skip
        return
    if kube_context is not None or kbs is not None:
        raise UsageError("--kube-context and --kbs are for --runtime pods",
                         hint="add --runtime pods")  # fmt: skip
    if worker not in ("vm", "host"):
        raise UsageError(f"unknown --worker {worker!r}", hint="choose vm or host")
    on_host = worker == "host"
    if on_host and workers is not None:
        raise UsageError(
            f"--worker host with --workers {workers}: the host runs the one worker",
            hint="leave out --workers (or use --worker vm --workers N for worker VMs)",
        )
    if not on_host and worker_threads is not None:
        raise UsageError(
            "--worker-threads is for --worker host",
            hint="worker VMs take --vcpus; add --worker host for a worker on this host",
        )
    spec = ClusterSpec(
        name=name,
        tee=_choice(Tee, "--tee", tee),
        worker_tee=_choice(Tee, "--worker-tee", worker_tee) if worker_tee else None,
        accel=_choice(Accel, "--accel", accel),
        masters=masters,
        workers=0 if on_host else (1 if workers is None else workers),
        worker_host=on_host,
        worker_threads=worker_threads,
        vcpus=vcpus,
        memory_mib=memory,
        image=image,
        network=network,
        connect=connect,
        subnet=subnet,
        broker=broker,
        broker_policy=policy,
        owner=str(owner.resolve()) if owner else None,
        locked=locked,
    )
    st = cluster.up(spec, keep_on_failure=keep_on_failure, image_path=image, timeout=timeout)
    _print_vms(st.name)


@app.command("down")
def down_cmd(
    name: str = typer.Option("gcvm", "--name", help="Cluster name."),
    connect: str | None = typer.Option(
        None,
        help="The libvirt daemon the cluster used, when "
        "its state file is gone and it was not a private one.",
    ),
) -> None:
    """Remove the cluster: VMs or pods, disks, network, namespace, daemons, state. Safe to
    repeat."""
    from orchestrator import cluster
    from orchestrator.pods import kube, lifecycle

    if kube.is_kube(name) or lifecycle.is_pods(name):
        (kube.down if kube.is_kube(name) else lifecycle.down)(name)
        return
    cluster.down(name, connect=connect)


def _print_vms(name: str) -> None:
    from rich.console import Console

    from orchestrator import cluster
    from orchestrator.ui import out

    report = cluster.status(name)
    # In a pipe rich assumes 80 columns and would cut names; scripts read this output.
    target = out if out.is_terminal else Console(width=120, highlight=False)
    for renderable in status_renderables(report):
        target.print(renderable, soft_wrap=True)


def status_renderables(report: Any) -> list[Any]:
    """`gcvm status`'s lines and table (a pure function of the status, for tests)."""
    from rich import box
    from rich.table import Table

    st = report.state
    lines: list[Any] = [
        f"cluster {st.name}: {st.phase}, accel {st.host.get('accel', '?')}, libvirt "
        f"{st.uri} (daemon {report.daemon})"
    ]
    table = Table(box=box.SIMPLE, pad_edge=False)
    for column in ("VM", "role", "rank", "address", "state", "TEE", "verified"):
        table.add_column(column, no_wrap=True)
    for row in report.vms:
        vm = row.vm
        table.add_row(
            vm.name,
            f"{vm.role} (locked)" if vm.locked else vm.role,
            str(vm.rank),
            vm.address,
            row.state,
            str(vm.tee),
            vm.tee_verified or "-",
        )
    hws = report.host_worker
    if hws is not None:
        hw = hws.worker
        table.add_row(hw.name, "worker (host)", str(hw.rank), hw.address, hws.state, "none",
                      "host process")  # fmt: skip
    lines.append(table)
    if hws is not None:
        hw = hws.worker
        device = f"{hw.device or '?'} ({hw.device_name or '?'})"
        if hw.device == "cpu":
            device += f", {hw.threads} threads"
        lines.append(
            f"host worker {hw.name}: {hws.state}, pid {hw.pid}, device {device}, "
            f"listens on {hw.address} ({hw.ifname}), up {format_uptime(hws.uptime_s)}, "
            f"log {hw.log}"
        )
    broker = report.state.cluster_broker
    if broker is not None:
        import time as _time

        from orchestrator import clusterbroker

        running = clusterbroker.alive(broker)
        uptime = _time.time() - broker.started if running and broker.started else 0.0
        lines.append(
            f"key broker: {'running' if running else 'dead'}, pid {broker.pid}, {broker.url}, "
            + (f"policy {broker.policy}" if broker.policy else "without attestation")
            + f", up {format_uptime(uptime)}, log {broker.log}"
        )
    trust = report.state.trust
    if trust:
        lines.append(
            f"pinned in every guest's boot: broker certificate sha256 "
            f"{str(trust.get('broker_cert_sha256'))[:16]}..., package signer "
            f"{trust.get('owner_key')} (owner folder {trust.get('owner')})"
        )
    return lines


def format_uptime(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@app.command("status")
def status_cmd(name: str = typer.Option("gcvm", "--name", help="Cluster name.")) -> None:
    """Show the cluster's VMs (or pods): role, rank, address, state, TEE requested and
    verified."""
    from orchestrator.pods import kube, lifecycle

    if lifecycle.is_pods(name) or kube.is_kube(name):
        from orchestrator.ui import out

        lines = kube.status_lines(name) if kube.is_kube(name) else lifecycle.status_lines(name)
        for line in lines:
            out.print(line, soft_wrap=True)
        return
    _print_vms(name)


@app.command("ssh", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh_cmd(
    ctx: typer.Context,
    node: str = typer.Argument(..., help="VM name, short name (master0) or rank."),
    name: str = typer.Option("gcvm", "--name", help="Cluster name."),
    timeout: float = typer.Option(3600.0, help="Seconds before the command is stopped."),
) -> None:
    """Run CMD on a VM (inside the cluster's namespace, pinned host key); no CMD: a shell."""
    import os

    from orchestrator import remote, state
    from orchestrator.ui import out

    argv = list(ctx.args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    st = state.load(name)
    vm = st.vm(node)
    if not argv:
        command = remote.ssh_argv(st, vm)
        os.execvp(command[0], command)
    with remote.Remote.connect(st, vm, timeout=30) as r:
        result = r.run(
            argv,
            timeout=timeout,
            check=False,
            on_line=lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True),
        )
    sys.exit(result.rc)  # typer.Exit is swallowed in non-standalone mode


@app.command("logs")
def logs_cmd(
    node: str = typer.Argument(..., help="VM name, short name (master0), rank or worker-host."),
    name: str = typer.Option("gcvm", "--name", help="Cluster name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
) -> None:
    """Print a VM's serial console log, the host worker's output (`worker-host`), or a pod's."""
    import time

    from orchestrator import state
    from orchestrator.errors import GcvmError
    from orchestrator.pods.lifecycle import is_pods, pod_log

    if is_pods(name):
        return print(pod_log(name, node), end="")
    st = state.load(name)
    hw = st.worker_host
    if hw is not None and st.is_host_worker(node):
        path = Path(hw.log)
        if not path.exists():
            raise GcvmError(f"the host worker has no log yet ({path})")
    else:
        vm = st.vm(node)
        path = Path(vm.serial_log)
        if not path.exists():
            raise GcvmError(f"{vm.name} has no serial log yet ({path})")
    with open(path, errors="replace") as f:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            if not follow:
                return
            time.sleep(0.5)


@app.command("top")
def top_cmd(
    name: str = typer.Option("gcvm", "--name", help="Cluster name."),
    once: bool = typer.Option(False, "--once", help="One sample, then exit."),
    interval: float = typer.Option(1.0, help="Seconds between samples."),
) -> None:
    """Each VM's, the host worker's or each pod's CPU and memory, live (libvirt's statistics,
    /proc, the pods' cgroups)."""
    from orchestrator import top
    from orchestrator.errors import UsageError

    if not 0.1 <= interval <= 3600:
        raise UsageError(f"--interval {interval:g} is out of range", hint="give 0.1..3600 s")
    from orchestrator.pods import lifecycle, resources

    (resources.top if lifecycle.is_pods(name) else top.top)(name, once=once, interval=interval)


# --- gcvm doctor / gcvm render: host facts, and the XML without touching a VM ---------------
from orchestrator import doctor as _doctor  # noqa: E402
from orchestrator import render as _render  # noqa: E402

app.command("doctor")(_doctor.doctor_command)
app.command("render")(_render.render_command)

# --- gcvm attest / gcvm broker: evidence verification and the key broker (orchestrator.attest) -
from orchestrator.attest import commands as _attest  # noqa: E402

app.add_typer(_attest.attest_app, name="attest")
app.add_typer(_attest.broker_app, name="broker")

# --- gcvm eval security: the framework's attack suite against every scheme, on this host ---------
eval_app = typer.Typer(help="Evaluate the schemes' security on this host.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command(
    "security", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def eval_security_cmd(ctx: typer.Context) -> None:
    """Run every attack against every scheme (`python -m groupcover attack ARGS...`): for
    example `--victim minilm-finetuned --schemes all --json out/security.json`."""
    from orchestrator import evaluate

    code = evaluate.run_security(ctx.args)
    if code:
        raise typer.Exit(code)


# --- gcvm model protect: a model package on this host (orchestrator.model) -------------------
from orchestrator.model import model_app  # noqa: E402

app.add_typer(model_app, name="model")
from orchestrator.scan.command import scan_cmd  # noqa: E402

app.command("scan")(scan_cmd)


def main() -> None:
    try:
        # In non-standalone mode typer turns Ctrl-C into exit code 130 and `raise typer.Exit(n)`
        # into n, and returns them instead of exiting: they must not end as exit 0.
        code = app(standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            if code == 130:
                console.print("[red]interrupted[/]")
            sys.exit(code)
    except GcvmError as exc:
        log.error("%s", exc.message, exc_info=True)
        console.print(f"[red]error:[/] {exc.message}")
        if exc.hint:
            console.print(f"[dim]hint:[/] {exc.hint}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)
    except typer.Exit as exc:  # pragma: no cover - typer's own exits
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        # Newer typer vendors click (typer._click): its usage errors are not click's classes.
        usage_errors: list[type[Exception]] = [click.ClickException]
        try:
            from typer._click import exceptions as vendored

            usage_errors.append(vendored.ClickException)
        except ImportError:
            pass
        if isinstance(exc, tuple(usage_errors)):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if isinstance(exc, click.exceptions.Abort | typer.Abort):
            console.print("[red]aborted[/]")
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
