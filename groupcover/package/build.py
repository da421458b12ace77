"""`protect`: a model in, a model package out (see `groupcover.package` for the layout).

Everything is written into a temporary folder beside DIR and renamed at the end, so a failure
leaves nothing half-written; the key file (model.key, or --key-out) is written last, mode 0600.
With the owner's signing key, signature.json is written with the rest, before the rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from groupcover.audit import Audit
from groupcover.errors import UsageError
from groupcover.master import NothingToOffload, offloadable_layers
from groupcover.models import as_tensor
from groupcover.modes import MODES, mode_settings
from groupcover.package import container, secrets
from groupcover.package.layout import (
    BASELINE_MODES,
    BASELINES,
    FORMAT_VERSION,
    KEY,
    MANIFEST,
    PUBLISHED,
    SEALED,
)
from groupcover.package.seal import new_key, seal_file
from groupcover.package.signature import sign_package
from groupcover.package.source import Source, example_inputs, load_source, spec_to_json
from groupcover.published import dtype_name, tensor_digest, write_published
from groupcover.rng import SecretRandom
from groupcover.schemes import make_scheme

DEFAULT_SCHEME = "hardened"  # the scheme gcvm recommends (docs/schemes.md)
PACKAGE_SCHEMES = ("hardened", "groupcover")  # the schemes that have benchmark modes
DEFAULT_REFERENCES = ((8, 128), (2, 16))
BASELINES_WARNING = (
    "baselines.sealed holds the plaintext weights of every offloaded layer, so that tee-only, "
    "plain-offload and mask-only can run from this package: for benchmarks only, never for a "
    "secret model"
)


def scheme_modes(scheme: str) -> tuple[str, ...]:
    return tuple(m for m in MODES if mode_settings(m)[0] == scheme)


def package_modes(scheme: str, baselines: bool) -> tuple[str, ...]:
    """The modes a package of `scheme` runs (what its manifest lists, in this order)."""
    return (*BASELINE_MODES, *scheme_modes(scheme)) if baselines else scheme_modes(scheme)


def parse_references(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            batch, seq = (int(v) for v in part.split("x"))
        except ValueError:
            raise UsageError(f"--reference {part!r} is not BxS (e.g. 8x128)") from None
        if not (1 <= batch <= 1024 and 1 <= seq <= 512):
            raise UsageError(f"--reference {part!r} is out of range (B 1..1024, S 1..512)")
        shapes.append((batch, seq))
    return tuple(dict.fromkeys(shapes))


@dataclass(frozen=True)
class ProtectOptions:
    scheme: str = DEFAULT_SCHEME
    k: int = 4
    baselines: bool = False
    references: tuple[tuple[int, int], ...] = DEFAULT_REFERENCES
    seed: int | None = None
    key_out: Path | None = None
    publish_audit: bool = True  # with baselines: make the audit's publish checks (see audit.py)
    signer: Any = None  # the owner's Ed25519 private key: sign the package (signature.json)


def _op_json(op: Any) -> dict[str, Any]:
    return {"kind": op.kind, "stride": list(op.stride), "padding": list(op.padding),
            "dilation": list(op.dilation), "params": dict(op.params)}  # fmt: skip


def protect_source(source: Source, out: Path, options: ProtectOptions) -> dict[str, Any]:
    """Writes the package of `source` to `out` (which must not exist, or be empty); returns the
    manifest."""
    start = time.perf_counter()
    if options.scheme not in PACKAGE_SCHEMES:
        raise UsageError(f"scheme {options.scheme!r} cannot make a package",
                         hint=f"choose {' or '.join(PACKAGE_SCHEMES)} (the default: "
                         f"{DEFAULT_SCHEME})")  # fmt: skip
    scheme = make_scheme(options.scheme, options.k)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists", hint="choose a new --out folder")
    key_path = options.key_out
    if key_path is not None and not key_path.parent.is_dir():
        raise UsageError(f"--key-out {key_path}: no folder {key_path.parent}")
    module = source.module.eval()
    spec = source.spec
    targets = offloadable_layers(module)
    if not targets:
        raise NothingToOffload(
            f"{type(module).__name__} has no layer to offload",
            hint="GroupCover offloads nn.Linear, nn.Conv1d and nn.Conv2d (groups=1) layers",
        )
    package_id = os.urandom(16).hex()
    rng = SecretRandom.create(options.seed)
    obfuscation = rng.spawn("obfuscation")
    published: dict[str, torch.Tensor] = {}
    bundle: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    audited: list[tuple[str, torch.Tensor, torch.Tensor | None, Any, torch.Tensor]] = []
    by_module: dict[int, dict[str, Any]] = {}
    removed: set[str] = set()
    with torch.no_grad():
        for name, layer, op in targets:
            removed.update({f"{name}.weight", f"{name}.bias"})
            seen = by_module.get(id(layer))
            if seen is not None:
                seen["aliases"].append(name)
                continue
            index = str(len(layers))
            weight = layer.weight.detach()
            bias = None if layer.bias is None else layer.bias.detach()
            worker_op = scheme.worker_op(op)
            obfuscated, secret = scheme.obfuscate(weight, bias, obfuscation.spawn(name))
            obfuscated = obfuscated.to(weight.dtype).contiguous()
            published[index] = obfuscated
            entry = {
                "index": index, "name": name, "aliases": [], "op": _op_json(worker_op),
                "plain_op": _op_json(op), "shape": list(obfuscated.shape),
                "dtype": dtype_name(obfuscated.dtype), "sha256": tensor_digest(obfuscated),
                "secret": secrets.encode(secret, f"layer/{index}", bundle),
            }  # fmt: skip
            layers.append(entry)
            by_module[id(layer)] = entry
            if options.baselines:
                plain[f"plain/{index}/weight"] = weight.contiguous().clone()
                if bias is not None:
                    plain[f"plain/{index}/bias"] = bias.contiguous().clone()
                audited.append((name, weight, bias, secret, obfuscated))
        state_keys = []
        for entry_name, value in module.state_dict(keep_vars=False).items():
            if entry_name in removed:
                continue
            bundle[f"state/{entry_name}"] = value.detach().contiguous().clone()
            state_keys.append(entry_name)
        references: dict[str, str] = {}
        shapes: list[tuple[str, tuple[int, int] | None]]
        if spec.fixed_inputs is not None:
            for i, t in enumerate(spec.fixed_inputs):
                bundle[f"inputs/{i}"] = t.detach().contiguous().clone()
            shapes = [("example", None)]
        else:
            shapes = [(f"{b}x{s}", (b, s)) for b, s in options.references]
        for label, shape in shapes:
            try:
                inputs = spec.fixed_inputs if shape is None else example_inputs(spec, *shape)
                assert inputs is not None
                bundle[f"ref/{label}"] = as_tensor(module(*inputs)).detach().contiguous().clone()
            except (RuntimeError, IndexError, ValueError) as exc:
                raise UsageError(f"{spec.name} cannot run the reference input {label}: "
                                 f"{str(exc).strip().splitlines()[0][:160]}",
                                 hint="choose --reference shapes the model accepts",
                                 ) from None  # fmt: skip
            references[label] = f"ref/{label}"
    modes = list(package_modes(options.scheme, options.baselines))
    meta = {
        "format": FORMAT_VERSION, "package_id": package_id, "model": spec_to_json(spec),
        "scheme": options.scheme, "k": options.k, "layers": layers, "state_keys": state_keys,
        "references": references, "baselines": options.baselines,
        "secrets": rng.notice,
    }  # fmt: skip
    key = new_key()
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        write_published(staging / PUBLISHED, published, package_id)
        sealed_digest = seal_file(staging / SEALED, container.pack(bundle, meta), key,
                                  label=f"gcvm master bundle {package_id}")  # fmt: skip
        baselines = None
        if options.baselines:
            audit_start = time.perf_counter()
            verdicts = publish_audit(audited, options.scheme) if options.publish_audit else {}
            baselines_meta = {"package_id": package_id, "publish_audit": verdicts,
                              "publish_audit_s": time.perf_counter() - audit_start}  # fmt: skip
            baselines = seal_file(staging / BASELINES,
                                  container.pack(plain, baselines_meta), key,
                                  label=f"gcvm baselines {package_id}")  # fmt: skip
        manifest = _manifest(spec, options, package_id, layers, modes, sealed_digest, baselines,
                             references, state_keys, time.perf_counter() - start)  # fmt: skip
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if options.signer is not None:  # before the key is written: model.key is never signed
            sign_package(staging, options.signer)
        if key_path is None:
            _write_key(staging / KEY, key)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
        if key_path is not None:
            _write_key(key_path, key)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def publish_audit(
    layers: list[tuple[str, torch.Tensor, torch.Tensor | None, Any, torch.Tensor]], mode: str
) -> dict[str, dict[str, Any]]:
    """The payload audit's publish checks on every published weight, made here once (the
    plaintext is at hand) and sealed with the baselines: a master's audit takes each verdict
    for a published payload with the same SHA-256 (see `groupcover.audit`). Every layer is
    registered first, so each weight is checked against every layer's plaintext and secrets."""
    audit = Audit(mode=mode)
    with torch.no_grad():
        for name, weight, bias, secret, _ in layers:
            audit.register_layer(name, weight, bias, secret)
        return {name: audit.publish_verdict(name, published)
                for name, _, _, _, published in layers}  # fmt: skip


def _write_key(path: Path, key: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _manifest(spec: Any, options: ProtectOptions, package_id: str, layers: list[dict[str, Any]],
              modes: list[str], sealed: str, baselines: str | None, references: dict[str, str],
              state_keys: list[str], seconds: float) -> dict[str, Any]:  # fmt: skip
    holds = [
        f"secrets of {len(layers)} offloaded layers (input/output transforms or permutations "
        "and de-mixing tables, biases)",
        f"{len(state_keys)} non-offloaded parameters and buffers (embeddings, norms, ...)",
        "the model's architecture and configuration",
        "the SHA-256 of every published tensor",
    ]
    if spec.tokenizer is not None:
        holds.append("the tokenizer")
    if spec.factory_source is not None:
        holds.append("the model factory's source and its example input")
    holds.append("sealed reference outputs for " + (", ".join(references) or "no input"))
    return {
        "format": FORMAT_VERSION,
        "package_id": package_id,
        "model": spec.public(),
        "scheme": options.scheme,
        "k": options.k if options.scheme == "groupcover" else None,
        "modes": modes,
        "secrets": "reproducible from --seed: not secret"
        if options.seed is not None
        else "drawn from the OS CSPRNG",
        "layers": [
            {
                "id": e["index"],
                "op": e["op"]["kind"],
                "shape": e["shape"],
                "dtype": e["dtype"],
                "sha256": e["sha256"],
            }
            for e in layers
        ],
        "published": PUBLISHED,
        "sealed": {"file": SEALED, "sha256": sealed, "holds": holds},
        "baselines": (
            {"file": BASELINES, "sha256": baselines, "warning": BASELINES_WARNING}
            if baselines is not None
            else None
        ),
        "references": list(references),
        "protect_seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
    }


def protect(src: str, out: Path, options: ProtectOptions) -> dict[str, Any]:
    return protect_source(load_source(src), out, options)
