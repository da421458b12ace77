"""GroupCover: obfuscated offload of linear layers from a trusted master to an untrusted worker.

The public API for researchers; everything else is reachable through its module.

- Schemes: `Scheme` (subclass it and set `name` to register a new one), `LayerSecret`, the
  registry `SCHEMES` and `make_scheme(name, k)`.
- One rank of a run: `RankSettings` -> `groupcover.launch.launch(settings)` -> exit code
  (`Role`: master or worker); the command line is `python -m groupcover`. (The function is not
  re-exported here: it would shadow the module `groupcover.launch`.)
- Model packages: `protect(src, out, ProtectOptions(...))` writes one, `open_package(dir)` reads
  its manifest and `.unseal(key)` opens it; `read_key(path)` reads a model key file.
- Attacks: `EvalSettings` -> `evaluate(settings)`, the security evaluation of the schemes.
- The wire: `TcpTransport` (the master's session with a worker) and `WorkerServer` (the worker).

Why lazy: these names are re-exported on first use (module `__getattr__`), not imported here,
because every `python -m groupcover.<module>` imports this file first, and guests run
`python -m groupcover.keyrelease` (no torch) on a slow CPU: importing torch and the framework
there would cost seconds for nothing. There is no import circle to hide (test_layering checks).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "SCHEMES": "groupcover.schemes",
    "LayerSecret": "groupcover.schemes",
    "Scheme": "groupcover.schemes",
    "make_scheme": "groupcover.schemes",
    "RankSettings": "groupcover.launch",
    "Role": "groupcover.launch",
    "ProtectOptions": "groupcover.package.build",
    "protect": "groupcover.package.build",
    "open_package": "groupcover.package.runtime",
    "read_key": "groupcover.package.keys",
    "EvalSettings": "groupcover.attacks.harness",
    "evaluate": "groupcover.attacks.harness",
    "TcpTransport": "groupcover.wire.client",
    "WorkerServer": "groupcover.wire.server",
}

__all__ = [
    "SCHEMES",
    "EvalSettings",
    "LayerSecret",
    "ProtectOptions",
    "RankSettings",
    "Role",
    "Scheme",
    "TcpTransport",
    "WorkerServer",
    "evaluate",
    "make_scheme",
    "open_package",
    "protect",
    "read_key",
]

if TYPE_CHECKING:
    from groupcover.attacks.harness import EvalSettings, evaluate
    from groupcover.launch import RankSettings, Role
    from groupcover.package.build import ProtectOptions, protect
    from groupcover.package.keys import read_key
    from groupcover.package.runtime import open_package
    from groupcover.schemes import SCHEMES, LayerSecret, Scheme, make_scheme
    from groupcover.wire.client import TcpTransport
    from groupcover.wire.server import WorkerServer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'groupcover' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
