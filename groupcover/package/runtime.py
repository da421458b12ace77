"""The master's side of a model package: open it with the model key, build each mode from it.

`open_package(DIR)` reads the public manifest; `PackageFiles.unseal(key)` decrypts master.sealed
in memory (chunk by chunk into one buffer; tensors are views of it) and returns an
`UnsealedPackage`, which builds the protected model of a mode (`build`) without obfuscating
anything and without holding the published weights: each is read from the master's own copy of
published.safetensors, checked against the digest sealed in the bundle, when the transport, the
mask pool or the integrity check needs it. Baseline modes (tee-only, plain-offload, mask-only)
open baselines.sealed, which only a package protected with --baselines has.

Who made a package: `PackageFiles.verify(owner_key)` checks the owner's signature over its files
(`groupcover.package.signature`) before the key is asked for; the sealed files are hashed again as
they are decrypted. Whatever the signature, `unseal` refuses a manifest that disagrees with the
sealed bundle (the bundle is authoritative), and runs a package's own code (a `FILE.py:FUNCTION`
factory) only from an authenticated package.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from groupcover.audit import Audit
from groupcover.errors import UsageError
from groupcover.layer_op import LayerOp, PublishedRef
from groupcover.master import PackagedLayer, ProtectedModel, _replace, assemble
from groupcover.modes import MasterOnlyModel, mode_settings, parse_mode
from groupcover.package import container, secrets, signature
from groupcover.package.build import package_modes
from groupcover.package.layout import (
    BASELINE_MODES,
    BASELINES,
    FORMAT_VERSION,
    MANIFEST,
    PUBLISHED,
    SEALED,
    PackageError,
)
from groupcover.package.seal import open_file_into
from groupcover.package.source import ModelSpec, build_skeleton, example_inputs, spec_from_json
from groupcover.published import PublishedFile
from groupcover.schemes import IdentityScheme, LayerSecret, Scheme, channel_dim_of, make_scheme
from groupcover.transport import Transport
from groupcover.trust import b64url

AUDIT_SKIPPED = (
    "audit skipped: the payload audit compares payloads with the plaintext weights, which this "
    "package does not hold (protect it with --baselines to audit a benchmark)"
)


class ModeUnavailable(UsageError):
    """A mode this package cannot run (another scheme, or a baseline without --baselines)."""


@dataclass
class PackageFiles:
    root: Path
    manifest: dict[str, Any]
    manifest_bytes: bytes = field(default=b"", repr=False)  # what `manifest` was parsed from
    signed: dict[str, str] | None = None  # the signed digests, once `verify` passed
    signed_by: bytes | None = None  # the owner key that signed it (raw Ed25519)
    # its code may run: signed by the pinned owner, or written by this very process
    authenticated: bool = False

    def verify(self, owner_key: bytes) -> None:
        """Refuses this package unless `owner_key` signed exactly its files (before any key is
        asked for, and before any sealed byte is decrypted)."""
        self.signed = signature.verify_package(self.root, self.manifest_bytes, owner_key)
        self.signed_by = owner_key
        self.authenticated = True

    def facts(self) -> dict[str, Any]:
        """For the key_release facts: whether results come from a package the owner signed."""
        return {"package_signed_by": b64url(self.signed_by) if self.signed_by else None,
                "package_authenticated": self.authenticated}  # fmt: skip

    def signed_digest(self, name: str) -> str | None:
        """The digest `name` must have (None: the package was not verified)."""
        if self.signed is None:
            return None
        if name not in self.signed:
            raise signature.SignatureError(f"package {self.root} holds {name}, which the "
                                           "owner's signature does not cover")  # fmt: skip
        return self.signed[name]

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("modes", ()))

    def check_modes(self, modes: Sequence[str]) -> None:
        missing = [m for m in modes if m not in self.modes]
        if not missing:
            return
        if any(m in BASELINE_MODES for m in missing) and not self.manifest.get("baselines"):
            raise ModeUnavailable(
                f"package {self.root} cannot run {', '.join(missing)}: it was protected without "
                "--baselines",
                hint=f"it runs {', '.join(self.modes)}; protect it again with --baselines for "
                "the benchmark baselines (plaintext weights, never for a secret model)",
            )
        raise ModeUnavailable(
            f"package {self.root} (scheme {self.manifest.get('scheme')}) cannot run "
            f"{', '.join(missing)}",
            hint=f"it runs {', '.join(self.modes)}",
        )

    def check_sealed(self, key: bytes) -> None:
        """The manifest against the sealed bundle, nothing built (the owner, before signing)."""
        meta, _ = container.unpack(open_file_into(self.root / SEALED, key))
        check_manifest(self.root, self.manifest, meta)

    def unseal(self, key: bytes) -> UnsealedPackage:
        buffer = open_file_into(self.root / SEALED, key, self.signed_digest(SEALED))
        meta, tensors = container.unpack(buffer)
        check_manifest(self.root, self.manifest, meta)
        model = meta.get("model") or {}
        if (model.get("kind") == "factory" or model.get("factory_source")) and \
                not self.authenticated:  # fmt: skip
            raise signature.SignatureError(
                f"package {self.root} carries model code ({model.get('name')}), which this "
                "master runs only from a package its owner signed",
                hint="pin the owner's key (gcvm.owner_key= on the measured kernel command line, "
                "or --owner-key OWNER.pub where nothing is measured) and sign the package with "
                "`python -m groupcover sign DIR --sign-key owner.key`",
            )
        published = PublishedFile(self.root / PUBLISHED)
        if meta.get("package_id") != published.package_id:
            raise PackageError(
                f"{self.root / PUBLISHED} belongs to another package than {SEALED}",
                hint="keep the files of one `protect` run together",
            )
        return UnsealedPackage(self, key, meta, tensors, published)


def open_package(path: str | Path) -> PackageFiles:
    root = Path(path)
    try:
        raw = (root / MANIFEST).read_bytes()
        manifest = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise PackageError(f"{root} is not a model package: {exc.strerror or exc}",
                           hint="make one with `python -m groupcover protect SRC --out DIR`") \
            from None  # fmt: skip
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the stack
        raise PackageError(f"{root / MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise PackageError(f"{root / MANIFEST}: unknown package format")
    modes = manifest.get("modes", [])
    if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
        raise PackageError(f"{root / MANIFEST}: its modes are not a list of names")
    for name in (SEALED, PUBLISHED):
        if not (root / name).is_file():
            raise PackageError(f"package {root} has no {name}")
    return PackageFiles(root, manifest, raw)


def _manifest_says(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "package_id": manifest.get("package_id"),
        "model": manifest.get("model"),
        "scheme": manifest.get("scheme"),
        "k": manifest.get("k"),
        "modes": manifest.get("modes"),
        "baselines": bool(manifest.get("baselines")),
        "layers": manifest.get("layers"),
        "references": sorted(manifest.get("references") or ()),
    }


def _layer_says(entry: dict[str, Any]) -> dict[str, Any]:
    return {"id": entry["index"], "op": entry["op"]["kind"], "shape": entry["shape"],
            "dtype": entry["dtype"], "sha256": entry["sha256"]}  # fmt: skip


def _bundle_says(meta: dict[str, Any]) -> dict[str, Any]:
    """What the manifest must say, from the sealed meta (as `build._manifest` writes it)."""
    model = meta.get("model") or {}
    scheme, baselines = meta.get("scheme"), bool(meta.get("baselines"))
    return {
        "package_id": meta.get("package_id"),
        "model": {k: model.get(k) for k in ("kind", "name", "config")},
        "scheme": scheme,
        "k": meta.get("k") if scheme == "groupcover" else None,
        "modes": list(package_modes(str(scheme), baselines)),
        "baselines": baselines,
        "layers": [_layer_says(e) for e in meta.get("layers") or ()],
        "references": sorted(meta.get("references") or ()),
    }


def check_manifest(root: Path, manifest: dict[str, Any], meta: dict[str, Any]) -> None:
    """The public manifest must say what the sealed bundle says (the bundle is authoritative:
    only the key's holder could have written it). Refused for any package, signed or not: the
    master chose its modes from the manifest, and results name the model from it."""
    said, sealed = _manifest_says(manifest), _bundle_says(meta)
    for name, value in sealed.items():
        if said[name] == value:
            continue
        where = name
        if name in ("scheme", "k", "modes", "baselines", "package_id"):
            where = f"{name} (it says {said[name]!r}, the bundle {value!r})"
        elif name == "layers" and isinstance(said[name], list) and len(said[name]) == len(value):
            index = next(i for i, (a, b) in enumerate(zip(said[name], value, strict=True))
                         if a != b)  # fmt: skip
            theirs = said[name][index] if isinstance(said[name][index], dict) else {}
            wrong = [f for f in value[index] if theirs.get(f) != value[index][f]]
            where = f"layer {index}" + (f" ({wrong[0]})" if wrong else "")
        raise PackageError(
            f"{root / MANIFEST} disagrees with the sealed bundle on {where}",
            hint="the manifest was altered after `protect` wrote it: use the package as written",
        )


def _op(data: dict[str, Any]) -> LayerOp:
    return LayerOp(data["kind"], tuple(data["stride"]), tuple(data["padding"]),
                   tuple(data["dilation"]), dict(data.get("params") or {}))  # fmt: skip


@dataclass
class UnsealedPackage:
    files: PackageFiles
    key: bytes = field(repr=False)
    meta: dict[str, Any] = field(repr=False)
    tensors: dict[str, torch.Tensor] = field(repr=False)
    published: PublishedFile
    _plain: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _publish_verdicts: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.spec: ModelSpec = spec_from_json(self.meta["model"], self.tensors)
        self.scheme: Scheme = make_scheme(self.meta["scheme"], int(self.meta.get("k") or 4))
        self.package_id: str = self.meta["package_id"]
        self.layers: list[dict[str, Any]] = self.meta["layers"]
        self._secrets: dict[str, LayerSecret] = {
            e["index"]: secrets.decode(e["secret"], self.tensors) for e in self.layers
        }

    @property
    def modes(self) -> tuple[str, ...]:
        return self.files.modes

    def inputs(self, batch: int, seq: int) -> tuple[torch.Tensor, ...]:
        return example_inputs(self.spec, batch, seq)

    def reference_label(self, batch: int, seq: int) -> str:
        return "example" if self.spec.fixed_inputs is not None else f"{batch}x{seq}"

    def reference(self, batch: int, seq: int) -> torch.Tensor | None:
        """The sealed reference output for these inputs, if the owner sealed one."""
        key = self.meta["references"].get(self.reference_label(batch, seq))
        return None if key is None else self.tensors[key]

    # -- the model's parts

    def _module(self) -> nn.Module:
        """The skeleton with every non-offloaded parameter and buffer of the bundle."""
        return build_skeleton(self.spec)

    def _load_state(self, module: nn.Module) -> nn.Module:
        state = {key: self.tensors[f"state/{key}"] for key in self.meta["state_keys"]}
        module.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()]
                if t.is_meta]  # fmt: skip
        if left:
            raise PackageError(f"the package does not hold {left[0]} (and {len(left) - 1} more)")
        return module.eval()

    def _published_loader(self, entry: dict[str, Any]) -> Any:
        published, index, digest = self.published, entry["index"], entry["sha256"]

        def load() -> torch.Tensor:
            return published.read(index, digest=digest)

        return load

    def plain(self) -> dict[str, torch.Tensor]:
        """The sealed baselines (plaintext offloaded weights): only for baseline modes."""
        if self._plain is None:
            path = self.files.root / BASELINES
            if not self.meta.get("baselines") or not path.is_file():
                raise ModeUnavailable(
                    f"package {self.files.root} holds no baselines",
                    hint="protect it again with --baselines (benchmarks only)",
                )
            expected = self.files.signed_digest(BASELINES)
            meta, tensors = container.unpack(open_file_into(path, self.key, expected))
            if meta.get("package_id") != self.package_id:
                raise PackageError(f"{path} belongs to another package")
            self._plain = tensors
            self._publish_verdicts = dict(meta.get("publish_audit") or {})
        return self._plain

    def _plain_weight(self, entry: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        plain = self.plain()
        index = entry["index"]
        return plain[f"plain/{index}/weight"], plain.get(f"plain/{index}/bias")

    def plaintext_module(self) -> nn.Module:
        """tee-only: the whole model in the master (baselines)."""
        module = self._module()
        state = {key: self.tensors[f"state/{key}"] for key in self.meta["state_keys"]}
        for entry in self.layers:
            weight, bias = self._plain_weight(entry)
            for name in (entry["name"], *entry["aliases"]):
                state[f"{name}.weight"] = weight
                if bias is not None:
                    state[f"{name}.bias"] = bias
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def build(
        self,
        mode: str,
        transport: Transport,
        *,
        seed: int | None = None,
        mask_pool: int = 1,
        mask_budget: int | None = None,
        audit: bool = False,
        verify: bool = True,
        example: Sequence[torch.Tensor] | None = None,
        by_reference: bool = True,
    ) -> nn.Module:
        """The model as `mode` runs it from this package (see `groupcover.modes`)."""
        chosen = str(parse_mode(mode))
        self.files.check_modes([chosen])
        scheme_name, masked = mode_settings(chosen)
        if scheme_name is None:
            auditor = None
            if audit:
                auditor = Audit(mode=chosen)
                transport.add_observer(auditor.observe)
            return MasterOnlyModel(self.plaintext_module(), auditor)
        baseline = chosen in BASELINE_MODES
        scheme: Scheme = IdentityScheme() if baseline else self.scheme
        layers = []
        audit_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        verdicts: dict[str, dict[str, Any]] = {}
        if audit and self.meta.get("baselines"):
            audit_weights = {e["name"]: self._plain_weight(e) for e in self.layers}
            if not baseline:  # baseline modes publish the plaintext, not the package's weights
                verdicts = self._publish_verdicts
        for entry in self.layers:
            op = _op(entry["plain_op"] if baseline else entry["op"])
            shape = tuple(entry["shape"])
            if baseline:
                weight, bias = self._plain_weight(entry)
                secret = LayerSecret(channel_dim_of(weight), int(weight.shape[0]), bias=bias)

                def load(weight: torch.Tensor = weight) -> torch.Tensor:
                    return weight

                ref = None
            else:
                secret = self._secrets[entry["index"]]
                load = self._published_loader(entry)
                ref = PublishedRef(self.package_id, int(entry["index"]), entry["sha256"], shape,
                                   "float32" if entry["dtype"] == "F32" else
                                   {"F64": "float64", "F16": "float16",
                                    "BF16": "bfloat16"}[entry["dtype"]])  # fmt: skip
            layers.append(PackagedLayer(entry["name"], tuple(entry["aliases"]), op, secret, shape,
                                        load, ref if by_reference else None))  # fmt: skip
        module = self._module()
        for entry in self.layers:  # the proxies take these places; the state has no weight
            for name in (entry["name"], *entry["aliases"]):
                _replace(module, name, nn.Identity())
        module = self._load_state(module)
        built = assemble(
            module, layers, transport, scheme=scheme, masked=masked, seed=seed,
            mask_pool=mask_pool, mask_budget=mask_budget, audit_weights=audit_weights,
            audit_verdicts=verdicts, example_inputs=example if masked else None, mode=chosen,
            verify=verify,
        )  # fmt: skip
        if audit and audit_weights is None:
            built.audit_note = AUDIT_SKIPPED
        return built


def protected_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor a built model holds (parameters, buffers, secrets, mask pools): for tests."""
    found: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    if isinstance(model, ProtectedModel):
        for layer in model.layers.values():
            found += list(layer.secret.tensors().values())
            for attr in vars(layer.secret).values():
                if isinstance(attr, torch.Tensor):
                    found.append(attr)
    return found


__all__ = ["PackageFiles", "UnsealedPackage", "open_package"]


# ---- several packages in one run (a master given --model DIR1 --model DIR2 ...) -------------


def key_resource(package_id: str) -> str:
    """The broker resource holding one package's model key (`gcvm/<package_id>/key`)."""
    return f"gcvm/{package_id}/key"


def assign_modes(packages: Sequence[PackageFiles], modes: Sequence[str]) -> dict[str, int]:
    """For each mode, the index of the package that runs it: the first whose scheme is the
    mode's own, else (baseline modes) the first protected with --baselines. A mode no package
    runs is refused in one line, naming what each package runs."""
    if len(packages) == 1:
        packages[0].check_modes(modes)
        return dict.fromkeys(modes, 0)
    chosen: dict[str, int] = {}
    for mode in modes:
        scheme = mode_settings(mode)[0]
        able = [i for i, p in enumerate(packages) if mode in p.modes]
        same = [i for i in able if packages[i].manifest.get("scheme") == scheme]
        if not able:
            runs = "; ".join(f"{p.root}: {', '.join(p.modes)}" for p in packages)
            hint = (
                "protect a package with --baselines for tee-only, plain-offload and mask-only"
                if mode in BASELINE_MODES
                else f"protect a package with --scheme {scheme} for {mode}"
            )
            raise ModeUnavailable(f"no package given can run {mode} ({runs})", hint=hint)
        chosen[mode] = (same or able)[0]
    return chosen
