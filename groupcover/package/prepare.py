"""A run's model, made ready for its modes: `prepare(ModelRequest) -> Prepared`.

A package folder (or several) is opened and unsealed with its released key; a built-in model name
is protected on the fly into temporary packages (one per scheme the modes need, with baselines:
the built-in models are public), removed by `Prepared.close`. `prepare_plaintext` keeps a
plaintext model in this process instead (library callers and tests). The request holds only what
preparation needs, so nothing here knows the command line's settings.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from groupcover.errors import UsageError
from groupcover.models import as_tensor, load_model
from groupcover.modes import mode_settings
from groupcover.package.build import ProtectOptions, protect_source
from groupcover.package.keys import DEFAULT_RESOURCE, KeySource, in_memory, obtain_key, read_key
from groupcover.package.layout import is_package
from groupcover.package.runtime import assign_modes, key_resource, open_package
from groupcover.package.source import load_source
from groupcover.trust import Pins

MODEL_SEED = 0  # the synthetic models' random weights: fixed, independent of the secrets' seed
MiB = 1 << 20


@dataclass(frozen=True)
class ModelRequest:
    """What preparing a run's model needs: the model(s), the modes to run, the input size, and
    where the model keys come from."""

    models: tuple[str, ...]  # a built-in name, or one or more package folders
    modes: tuple[str, ...]
    batch: int
    seq: int
    seed: int | None = None  # None: secrets from the OS (built-in models protected on the fly)
    audit: bool = False  # built-in models: run the publish audit while protecting
    key_files: tuple[Path, ...] = ()  # one per package, in order (empty: the broker releases)
    broker: str | None = None
    tee: str | None = None
    mask_budget_mb: float | None = None  # all masked modes' pools together; None: unbounded
    pins: Pins = Pins()  # noqa: RUF009 (frozen: immutable); the broker and owner identities this master trusts (groupcover.trust)

    @property
    def model(self) -> str:
        """The first (or only) model: what results name when a package has no name."""
        return self.models[0]


@dataclass
class Prepared:
    """What the master runs: the model as packages (or, for library callers, a plaintext model),
    its inputs and the sealed reference output (None: exactness not checked)."""

    model: nn.Module | None
    inputs: tuple[torch.Tensor, ...]
    reference: torch.Tensor | None
    load_s: float
    packages: dict[str, Any] = field(default_factory=dict)  # mode -> UnsealedPackage
    key_release: dict[str, Any] | None = None
    reference_note: str | None = None  # why exactness is not checked
    mask_budget: int | None = None  # bytes per masked mode's pool (packages)
    cleanup: list[Path] = field(default_factory=list)  # temporary packages (built-in names)
    protect_s: float = 0.0  # built-in names: protecting on the fly
    model_name: str | None = None  # what results call the model (a package: its manifest's name)

    def close(self) -> None:
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self.cleanup.clear()


def prepare(request: ModelRequest) -> Prepared:
    """The master's model as packages: a package folder opened with the released key, or a
    built-in model name protected on the fly into temporary packages (one per scheme the modes
    need, with baselines: the built-in models are public), removed when the run ends."""
    start = time.perf_counter()
    prepare_model = _prepare_package if is_package(request.model) else _prepare_builtin
    prepared = prepare_model(request)
    prepared.load_s = time.perf_counter() - start
    masked = [m for m in request.modes if mode_settings(m)[1]]  # each gets a share of the budget
    if request.mask_budget_mb is not None and masked:
        prepared.mask_budget = int(request.mask_budget_mb * MiB / len(masked))
    return prepared


def _prepare_package(request: ModelRequest) -> Prepared:
    files = [open_package(path) for path in request.models]
    if request.pins.owner_key is not None:  # who made each: before any key is asked for
        for package in files:
            package.verify(request.pins.owner_key)
    chosen = assign_modes(files, request.modes)
    used = sorted(set(chosen.values()))
    keys = request.key_files
    unsealed: dict[int, Any] = {}
    facts: list[dict[str, Any]] = []
    for index in used:  # a package no mode needs is neither released nor opened
        # one package: the broker's gcvm/model/key (as before); several: gcvm/<package_id>/key
        resource = (DEFAULT_RESOURCE if len(files) == 1
                    else key_resource(files[index].manifest["package_id"]))  # fmt: skip
        source = KeySource(keys[index] if keys else None, request.broker, request.tee,
                           resource, request.pins)  # fmt: skip
        release = obtain_key(source)
        unsealed[index] = files[index].unseal(release.key)
        facts.append({**release.facts, "package": str(files[index].root),
                      **files[index].facts()})  # fmt: skip
    merged = dict(facts[0])
    if len(facts) > 1:
        merged["seconds"] = round(sum(float(f.get("seconds") or 0.0) for f in facts), 4)
        merged["per_package"] = facts
    packages = {mode: unsealed[chosen[mode]] for mode in request.modes}
    prepared = _from_packages(request, packages, merged)
    name = (files[0].manifest.get("model") or {}).get("name")  # the bytes verified, not re-read
    prepared.model_name = str(name) if name else None  # a folder: the model, not where it lies
    return prepared


def _from_packages(request: ModelRequest, packages: dict[str, Any],
                   key_release: dict[str, Any] | None) -> Prepared:  # fmt: skip
    first = next(iter(packages.values()))
    inputs = tuple(first.inputs(request.batch, request.seq))
    reference = first.reference(request.batch, request.seq)
    note = None
    if reference is None:
        note = (f"exactness not checked: no sealed reference for "
                f"{first.reference_label(request.batch, request.seq)}")  # fmt: skip
    return Prepared(None, inputs, reference, 0.0, packages, key_release, note)


def _prepare_builtin(request: ModelRequest) -> Prepared:
    source = load_source(request.model)
    schemes: set[str] = set()
    for mode in request.modes:
        named = mode_settings(mode)[0]
        if named is not None and named != "identity":
            schemes.add(named)
    if not schemes:
        schemes = {"groupcover"}  # baselines only: any scheme's package holds them
    start = time.perf_counter()
    by_scheme: dict[str, Any] = {}
    cleanup: list[Path] = []
    key = b""
    try:
        for scheme in sorted(schemes):
            folder = Path(tempfile.mkdtemp(prefix=f"gcvm-{request.model}-{scheme}-"))
            cleanup.append(folder)
            options = ProtectOptions(scheme=scheme, baselines=True, seed=request.seed,
                                     references=((request.batch, request.seq),),
                                     publish_audit=request.audit)  # fmt: skip
            try:
                protect_source(source, folder / "package", options)
            except UsageError as exc:
                if "cannot run the reference input" in exc.message:
                    raise UsageError(
                        f"{request.model} cannot run batch {request.batch} x seq "
                        f"{request.seq}: {exc.message.split(': ', 1)[-1]}",
                        hint="choose a batch and sequence length (image side for resnet18) the "
                        "model accepts",
                    ) from None
                raise
            key = read_key(folder / "package" / "model.key")
            files = open_package(folder / "package")
            files.authenticated = True  # written a moment ago by this very process
            by_scheme[scheme] = files.unseal(key)
    except BaseException:
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        raise
    del source
    packages = {}
    for mode in request.modes:
        wanted = mode_settings(mode)[0] or ""
        packages[mode] = by_scheme.get(wanted, next(iter(by_scheme.values())))
    prepared = _from_packages(request, packages, {**in_memory(key).facts, **files.facts()})
    prepared.cleanup = cleanup
    prepared.protect_s = time.perf_counter() - start
    return prepared


def prepare_plaintext(request: ModelRequest) -> Prepared:
    """A plaintext model in this process (library callers and tests): protected per mode by
    `groupcover.modes.build_for_mode`, exactness checked against the plaintext output."""
    start = time.perf_counter()
    # Model weights (random ones for the synthetic models) do not depend on the secrets' seed.
    model, example_input_fn = load_model(request.model, MODEL_SEED)
    model.eval()
    inputs = tuple(example_input_fn(request.batch, request.seq))
    try:
        with torch.no_grad():
            reference = as_tensor(model(*inputs)).detach().clone()
    except (RuntimeError, IndexError, ValueError) as exc:
        raise UsageError(
            f"{request.model} cannot run batch {request.batch} x seq {request.seq}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            hint="choose a batch and sequence length (image side for resnet18) the model accepts",
        ) from None
    return Prepared(model, inputs, reference, time.perf_counter() - start)
