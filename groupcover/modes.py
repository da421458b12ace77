"""The benchmark's modes: each names a scheme (or none) and whether inputs are masked.

Every unmasked mode that offloads is UNPROTECTED: its results say `protected: false` and
"unprotected (no masks)" (`protection`), whatever obfuscation its weights carry.

| mode                | what the worker gets                  | master keeps            | inputs   |
|---------------------|---------------------------------------|-------------------------|----------|
| `tee-only`          | nothing                               | the whole model         | not sent |
| `plain-offload`     | plaintext weights, plaintext inputs   | biases, non-linear part | EXPOSED  |
| `mask-only`         | plaintext weights, masked inputs      | + one-time masks        | masked   |
| `groupcover`        | obfuscated weights, masked inputs     | + GroupCover secrets    | masked   |
| `groupcover-nomask` | obfuscated weights, permuted inputs   | GroupCover secrets      | EXPOSED  |
| `hardened`          | two-sided transformed weights, masked | + hardened secrets      | masked   |
| `hardened-nomask`   | two-sided transformed weights, inputs | hardened secrets        | EXPOSED  |
| `groupcover-2w`     | as `groupcover`; a 2nd worker gets r  | GroupCover secrets      | masked   |
| `hardened-2w`       | as `hardened`; a 2nd worker gets r    | hardened secrets        | masked   |

The `-2w` modes take the masks' products from a second worker (the *mask worker*): the worker
computes op(x + r, W'') on the masked input, the mask worker op(r, W'') on the mask alone, and
the master makes no product for its masks. Each worker alone sees a tensor independent of the
input (a uniform payload, or the uniform mask itself); the two together see x. They protect
the input only where the two workers do not collude: a user who runs them must trust that.

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

from groupcover.audit import Audit
from groupcover.errors import UsageError
from groupcover.masks import MaskPolicy
from groupcover.master import DEFAULT_MASK_POOL, protect
from groupcover.transport import Transport


class Mode(StrEnum):
    TEE_ONLY = "tee-only"
    PLAIN_OFFLOAD = "plain-offload"
    MASK_ONLY = "mask-only"
    GROUPCOVER = "groupcover"
    GROUPCOVER_NOMASK = "groupcover-nomask"
    HARDENED = "hardened"  # groupcover/schemes/hardened.py
    HARDENED_NOMASK = "hardened-nomask"
    GROUPCOVER_2W = "groupcover-2w"  # masks' products from a second, non-colluding worker
    HARDENED_2W = "hardened-2w"


MODES: tuple[str, ...] = tuple(mode.value for mode in Mode)


class UnknownMode(UsageError, ValueError):
    """A mode name that is not one of `MODES`."""


@dataclass(frozen=True)
class ModeSettings:
    scheme: str | None  # None: nothing is offloaded
    masked: bool
    mask_worker: bool = False  # u = op(r, W'') from a second worker (no product in the master)


_SETTINGS: dict[Mode, ModeSettings] = {
    Mode.TEE_ONLY: ModeSettings(None, False),
    Mode.PLAIN_OFFLOAD: ModeSettings("identity", False),
    Mode.MASK_ONLY: ModeSettings("identity", True),
    Mode.GROUPCOVER: ModeSettings("groupcover", True),
    Mode.GROUPCOVER_NOMASK: ModeSettings("groupcover", False),
    Mode.HARDENED: ModeSettings("hardened", True),
    Mode.HARDENED_NOMASK: ModeSettings("hardened", False),
    Mode.GROUPCOVER_2W: ModeSettings("groupcover", True, mask_worker=True),
    Mode.HARDENED_2W: ModeSettings("hardened", True, mask_worker=True),
}


def parse_mode(mode: str) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise UnknownMode(
            f"unknown mode {mode!r}", hint=f"choose one of {', '.join(MODES)}"
        ) from None


UNPROTECTED_LABEL = "unprotected (no masks)"
PROTECTED_LABEL = "protected (one-time masks)"
TWO_WORKER_LABEL = "protected (one-time masks) if the two workers do not collude"


def protection(mode: str) -> dict[str, object]:
    """What every result of `mode` says about the input's protection: `protected` is true only
    where one-time masks hide the payloads. An unmasked mode sends the worker the input in the
    clear or under a fixed secret transform (`groupcover-nomask`, `hardened-nomask`): its
    payloads give an attacker an estimate of the transform, from which the block partition and
    much of the transform follow (`groupcover.attacks.partition`): unprotected, whatever its
    weights' obfuscation. `tee-only` offloads nothing (None: nothing to protect)."""
    chosen = parse_mode(mode)
    settings = _SETTINGS[chosen]
    if settings.scheme is None:
        return {"protected": None, "protection": "nothing offloaded"}
    if settings.mask_worker:
        return {"protected": True, "protection": TWO_WORKER_LABEL}
    if settings.masked:
        return {"protected": True, "protection": PROTECTED_LABEL}
    return {"protected": False, "protection": UNPROTECTED_LABEL}


def mode_settings(mode: str) -> tuple[str | None, bool]:
    """(scheme name or None, masked) for a mode name."""
    settings = _SETTINGS[parse_mode(mode)]
    return settings.scheme, settings.masked


def uses_mask_worker(mode: str) -> bool:
    """Whether `mode` takes its masks' products from a second worker (the `-2w` modes)."""
    return _SETTINGS[parse_mode(mode)].mask_worker


class MasterOnlyModel(nn.Module):
    """`tee-only`: the plaintext model runs in the master; nothing is offloaded or sent."""

    def __init__(self, module: nn.Module, audit: Audit | None) -> None:
        super().__init__()
        self.module = module.eval()
        self.layers: dict[str, nn.Module] = {}
        self.masks = None
        self.audit = audit

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(*args)


def build_for_mode(
    model: nn.Module,
    mode: str,
    transport: Transport,
    seed: int | None = None,
    *,
    k: int = 4,
    mask_pool: int = DEFAULT_MASK_POOL,
    audit: bool = False,
    example_inputs: Sequence[torch.Tensor] | None = None,
    mask_policy: MaskPolicy | str = MaskPolicy.REFILL,
    verify: bool = True,
) -> nn.Module:
    """The model as `mode` runs it; every returned module has `.layers`, `.masks` and `.audit`.

    `example_inputs` (forward arguments) fill the mask pools ahead of time in masked modes.
    `seed` None draws every secret from the OS CSPRNG; a seed makes them reproducible (and not
    secret). Every result of the worker is checked (`groupcover.integrity`) unless `verify` is
    False.
    """
    chosen = parse_mode(mode)
    scheme, masked = mode_settings(chosen)
    if scheme is None:
        auditor = None
        if audit:
            auditor = Audit(mode=str(chosen))
            transport.add_observer(auditor.observe)
        return MasterOnlyModel(model, auditor)
    return protect(
        model,
        transport,
        scheme=scheme,
        masked=masked,
        seed=seed,
        k=k,
        mask_pool=mask_pool,
        audit=audit,
        example_inputs=example_inputs if masked else None,
        mask_policy=mask_policy,
        mode=str(chosen),
        verify=verify,
    )
