"""TEE backends, one small class per TEE, dispatched by `Tee` through a dict.

`require(spec, caps)` is what `gcvm up` calls first: it resolves the accelerator and refuses,
naming every failed check, when the host cannot run the cluster's TEEs.
"""

from __future__ import annotations

from orchestrator.errors import HostUnsupported
from orchestrator.hostcaps import HostCaps
from orchestrator.spec import Accel, ClusterSpec, Tee
from orchestrator.tee.base import CheckFailure, DomainShape, TeeBackend, TeeOptions
from orchestrator.tee.none import NoTee
from orchestrator.tee.sev_snp import SevSnp, SnpLaunch
from orchestrator.tee.tdx import Tdx, TdxLaunch

__all__ = [
    "BACKENDS",
    "CheckFailure",
    "DomainShape",
    "SnpLaunch",
    "TdxLaunch",
    "TeeBackend",
    "TeeOptions",
    "backend",
    "require",
    "resolve_accel",
]

BACKENDS: dict[Tee, TeeBackend] = {b.tee: b for b in (NoTee(), Tdx(), SevSnp())}


def backend(tee: Tee) -> TeeBackend:
    return BACKENDS[Tee(tee)]


def resolve_accel(accel: Accel, caps: HostCaps) -> Accel:
    """auto -> kvm when a guest really runs under KVM here, else tcg."""
    if accel is Accel.auto:
        return Accel.kvm if caps.kvm_usable else Accel.tcg
    return accel


def require(spec: ClusterSpec, caps: HostCaps) -> Accel:
    """The accelerator the cluster runs with; HostUnsupported naming each failed check when the
    host cannot run the cluster's TEEs (TDX and SNP need KVM)."""
    tees = spec.tees
    accel = spec.accel
    if accel is Accel.auto:
        accel = Accel.kvm if caps.kvm_usable or any(t is not Tee.none for t in tees) else Accel.tcg
    failures: list[tuple[Tee, CheckFailure]] = []
    for tee in tees:
        failures += [(tee, f) for f in backend(tee).preconditions(caps, accel)]
    if failures and all(t is Tee.none for t, _ in failures):
        # no TEE asked for: what fails is the accelerator itself, not a TEE
        lines = "\n".join(f"  - {f.check}: {f.reason}" for _, f in failures)
        fixes = "; ".join(dict.fromkeys(f.fix for _, f in failures if f.fix))
        raise HostUnsupported(
            f"this host cannot run guests with --accel {accel}; failed checks:\n{lines}",
            hint=f"{fixes}; `gcvm doctor` shows all host facts"
            if fixes
            else "`gcvm doctor` shows all host facts",
        )
    if failures:
        names = ", ".join(f"--tee {t}" for t in dict.fromkeys(t for t, _ in failures))
        lines = "\n".join(f"  - [{t}] {f}" for t, f in failures)
        fallback = "--tee none" + (" (it runs under TCG here)" if not caps.kvm_usable else "")
        raise HostUnsupported(
            f"this host cannot run {names}; failed checks:\n{lines}",
            hint=f"run the same cluster without a TEE: {fallback}; `gcvm doctor` shows all "
            "host facts",
        )
    return accel
