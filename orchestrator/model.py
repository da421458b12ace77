"""`gcvm model protect`: a model package on the owner's machine.

The orchestrator never imports the framework: it starts `python -m groupcover protect` with the
interpreter gcvm runs under (the checkout's venv holds both halves), as `gcvm eval security`
does, and passes the arguments on. The package folder is what `gcvm run bench --model DIR`
deploys; the key file is what `gcvm broker serve --resource gcvm/model/key=FILE` releases.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import typer

from orchestrator.errors import UsageError

model_app = typer.Typer(help="Protect a model offline into a model package.",
                        no_args_is_help=True)  # fmt: skip


def protect_argv(src: str, out: Path, scheme: str | None, key_out: Path | None, k: int | None,
                 baselines: bool, reference: str | None, seed: int | None,
                 threads: int | None, sign_key: Path | None = None) -> list[str]:  # fmt: skip
    """The framework's command line for these options (what `gcvm model protect` runs)."""
    argv = [sys.executable, "-m", "groupcover", "protect", src, "--out", str(out)]
    if scheme is not None:
        argv += ["--scheme", scheme]
    if key_out is not None:
        argv += ["--key-out", str(key_out)]
    if k is not None:
        argv += ["--k", str(k)]
    if baselines:
        argv.append("--baselines")
    if reference is not None:
        argv += ["--reference", reference]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if sign_key is not None:
        argv += ["--sign-key", str(sign_key)]
    return argv


def run_protect(argv: list[str]) -> int:
    if importlib.util.find_spec("groupcover") is None or importlib.util.find_spec("torch") is None:
        raise UsageError(
            "protecting a model needs the framework (groupcover and torch) on this host",
            hint="run `make setup`: it installs the framework into .venv",
        )
    try:
        return subprocess.run(argv, check=False).returncode
    except KeyboardInterrupt:
        return 130


@model_app.command("protect")
def protect_cmd(
    src: str = typer.Argument(..., help="HF BERT checkpoint folder, FILE.py:FUNCTION or a "
                              "built-in model (minilm, bert-base, seed-transformer, resnet18)."),
    out: Path = typer.Option(..., "--out", help="The package folder to write (must not exist)."),
    scheme: str | None = typer.Option(None, help="hardened (default) or groupcover."),
    key_out: Path | None = typer.Option(None, "--key-out",
                                        help="The model key file (default OUT/model.key)."),
    k: int | None = typer.Option(None, "--k", help="Group size (groupcover)."),
    baselines: bool = typer.Option(False, "--baselines",
                                   help="Also seal the plaintext weights: benchmarks only."),
    reference: str | None = typer.Option(None, help="BxS[,BxS..] reference outputs to seal."),
    seed: int | None = typer.Option(None, help="Reproducible secrets (tests only: not secret)."),
    threads: int | None = typer.Option(None, help="Torch threads (default 1)."),
    sign_key: Path | None = typer.Option(None, "--sign-key", help="Sign the package with the "
                                         "owner's private key (python -m groupcover ownerkey)."),
) -> None:  # fmt: skip
    """Protect a model: published weights for workers, a sealed bundle for the master, its key."""
    code = run_protect(protect_argv(src, out, scheme, key_out, k, baselines, reference, seed,
                                    threads, sign_key))  # fmt: skip
    if code:
        raise typer.Exit(code)
