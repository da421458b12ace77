"""A model package's format, shared by its writer (`build`) and its readers (`runtime`, `keys`):
the file names in DIR/, the manifest's format version, which modes are baselines, and the error
a malformed package raises. DESIGN.md, "Model packages", describes the layout.
"""

from __future__ import annotations

from pathlib import Path

from groupcover.errors import PackageError as PackageError  # where readers look for it

FORMAT_VERSION = 1
MANIFEST, PUBLISHED, SEALED, BASELINES, KEY = (
    "manifest.json", "published.safetensors", "master.sealed", "baselines.sealed", "model.key",
)  # fmt: skip
SIGNATURE = "signature.json"  # the owner's signature over the other files (never model.key)
SIGNED_FILES = (MANIFEST, PUBLISHED, SEALED, BASELINES)  # every one that exists is signed
BASELINE_MODES = ("tee-only", "plain-offload", "mask-only")  # run from baselines.sealed


def is_package(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()
