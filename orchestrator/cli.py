"""The `gcvm` command line. The only place that turns a GcvmError into a message and exit code."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from orchestrator.errors import GcvmError
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
run_app = typer.Typer(help="Run GroupCover (or the seed's scripts) across the cluster's VMs.",
                      no_args_is_help=True)
app.add_typer(run_app, name="run")


@run_app.command("bench")
def run_bench_cmd(
    name: str = typer.Option("gcvm", "--name", help="Cluster name."),
    model: str = typer.Option("minilm", help="minilm, bert-base, seed-transformer or resnet18."),
    modes: str = typer.Option("plain-offload,groupcover",
                              help="Comma-separated: tee-only, plain-offload, mask-only, "
                              "groupcover, groupcover-nomask."),
    batch: int = typer.Option(8, help="Batch size (real samples per forward)."),
    seq: int = typer.Option(128, help="Sequence length (image side for resnet18)."),
    repeat: int = typer.Option(5, help="Timed forwards per mode."),
    warmup: int = typer.Option(1, help="Untimed forwards per mode first."),
    seed: int = typer.Option(0, help="Seed of the obfuscation and the masks."),
    audit: bool = typer.Option(True, help="Inspect every payload sent to a worker for secrets."),
    port: int = typer.Option(29500, help="Rendezvous port on master 0."),
    timeout: float = typer.Option(1800.0, help="Seconds before the run is stopped."),
    out: Path | None = typer.Option(None, help="Folder for results (default: gcvm's state folder)."),
) -> None:
    """Benchmark the modes side by side across the VMs; print a table, write JSON and a chart."""
    from orchestrator import bench

    settings = bench.BenchSettings(
        model=model, modes=tuple(m.strip() for m in modes.split(",") if m.strip()), batch=batch,
        seq=seq, repeat=repeat, warmup=warmup, seed=seed, audit=audit, port=port, timeout=timeout,
    )
    bench.run_bench(name, settings, out)


@run_app.command("exec", context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})
def run_exec_cmd(
    ctx: typer.Context,
    name: str = typer.Option("gcvm", "--name", help="Cluster name."),
    role: str = typer.Option("all", help="Run on: all, master or worker VMs."),
    port: int = typer.Option(29500, help="MASTER_PORT for the ranks."),
    timeout: float = typer.Option(3600.0, help="Seconds before the command is stopped."),
) -> None:
    """Run `-- CMD ARGS...` on the VMs with each rank's seed environment (RANK, WORLD_SIZE,
    WORKER, MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME, GCVM_ROLE)."""
    from orchestrator import bench
    from orchestrator.errors import UsageError
    from orchestrator.spec import Role

    if role not in ("all", "master", "worker"):
        raise UsageError(f"unknown --role {role!r}", hint="use all, master or worker")
    argv = list(ctx.args)
    roles = [Role.master, Role.worker] if role == "all" else [Role(role)]
    bench.run_exec(name, {r: argv for r in roles}, port=port, timeout=timeout)


@run_app.command("seed")
def run_seed_cmd(
    name: str = typer.Option("gcvm", "--name", help="Cluster name."),
    port: int = typer.Option(29500, help="MASTER_PORT for the ranks."),
    timeout: float = typer.Option(3600.0, help="Seconds before the scripts are stopped."),
) -> None:
    """Run the seed's tee_test_transformer_{worker,master}.py with the seed's variables."""
    from orchestrator import bench

    bench.run_exec(name, bench.SEED_COMMANDS, port=port, timeout=timeout)



# --- gcvm doctor / gcvm render: host facts, and the XML without touching a VM ---------------
from orchestrator import doctor as _doctor  # noqa: E402
from orchestrator import render as _render  # noqa: E402

app.command("doctor")(_doctor.doctor_command)
app.command("render")(_render.render_command)


def main() -> None:
    try:
        app(standalone_mode=False)
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

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            console.print("[red]aborted[/]")
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
