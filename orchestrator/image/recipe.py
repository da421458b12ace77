"""The recipe in `images/` and its hash (what the cache is keyed by)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from orchestrator.image.model import (
    BUILD_FORMAT,
    CMDLINE,
    GUEST_VENV,
    RECIPE_FILES,
    RECIPE_TREE,
    SUITE,
)
from orchestrator.image.pinned import KernelPin, parse_kernel_pin


@dataclass(frozen=True)
class Recipe:
    folder: Path
    packages: tuple[str, ...]
    wheels: tuple[str, ...]
    wheels_nodeps: tuple[str, ...]
    kernel: KernelPin

    @property
    def dpkg_cfg(self) -> Path:
        return self.folder / "dpkg.cfg"

    @property
    def customize(self) -> Path:
        return self.folder / "customize.sh"

    @property
    def tree(self) -> Path:
        return self.folder / RECIPE_TREE


def recipe_folder() -> Path:
    return Path(str(resources.files("images")))


def _list_file(path: Path) -> tuple[str, ...]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return tuple(line for line in lines if line)


def load_recipe(folder: Path | None = None) -> Recipe:
    folder = folder or recipe_folder()
    return Recipe(
        folder=folder,
        packages=_list_file(folder / "packages.txt"),
        wheels=_list_file(folder / "wheels.txt"),
        wheels_nodeps=_list_file(folder / "wheels-nodeps.txt"),
        kernel=parse_kernel_pin((folder / "kernel.txt").read_text()),
    )


def recipe_inputs(folder: Path | None = None) -> list[tuple[str, bytes]]:
    """What the recipe hash covers, in order: build constants, then every recipe file."""
    folder = folder or recipe_folder()
    constants = f"format={BUILD_FORMAT}\nsuite={SUITE}\nvenv={GUEST_VENV}\ncmdline={CMDLINE}\n"
    inputs = [("constants", constants.encode())]
    paths = [folder / name for name in RECIPE_FILES]
    paths += sorted(p for p in (folder / RECIPE_TREE).rglob("*") if p.is_file() or p.is_symlink())
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            inputs.append((f"{rel} -> link", os.readlink(path).encode()))
        else:
            mode = "x" if os.access(path, os.X_OK) else "-"
            inputs.append((f"{rel} {mode}", path.read_bytes()))
    return inputs


def recipe_hash(folder: Path | None = None) -> str:
    digest = hashlib.sha256()
    for name, data in recipe_inputs(folder):
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]
