"""The `gcvm` command line. The only place that turns a GcvmError into a message and exit code."""

from __future__ import annotations

import sys

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
