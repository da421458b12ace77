"""The guest image: build, cache and find gcvm's own Debian image, or take a user's disk image.

gcvm's image is built from the recipe in `images/` (package lists, files copied into the tree, a
customization script) with mmdebstrap from the host's own apt sources, plus a Python venv with
torch installed from wheels downloaded on the host. It is cached under
`images_dir()/<recipe hash>/` as a qcow2 base disk, the kernel and initrd for direct kernel boot,
the kernel's config, and `image.json` (what `find_image` reads back).

One job per module: `model` (constants, Image), `recipe` (the recipe and its hash), `apt` (the
host's sources), `commands` (running build commands, removing trees), `kernel` (guest kernel
facts), `lookup` (find_image, user_image), `steps` and `build` (`gcvm image build`), `info`.
"""

from orchestrator.image.apt import (
    AptSource,
    debian_sources,
    host_apt_sources,
    parse_deb822,
    parse_one_line,
)
from orchestrator.image.build import _clean_stale as _clean_stale
from orchestrator.image.build import _publish as _publish
from orchestrator.image.build import build_image
from orchestrator.image.commands import remove_tree
from orchestrator.image.info import describe_image
from orchestrator.image.kernel import tee_guest_support
from orchestrator.image.lookup import disk_format, find_image, user_image
from orchestrator.image.model import (
    BUILD_FORMAT,
    CMDLINE,
    DISK,
    GUEST_PYTHON,
    GUEST_VENV,
    INITRD,
    INITRD_MODULES,
    KERNEL,
    KERNEL_CONFIG,
    METADATA,
    ROOT_LABEL,
    SUITE,
    TEE_GUEST_OPTIONS,
    Image,
    tee_guest_problem,
)
from orchestrator.image.recipe import Recipe, load_recipe, recipe_folder, recipe_hash, recipe_inputs

__all__ = [
    "BUILD_FORMAT",
    "CMDLINE",
    "DISK",
    "GUEST_PYTHON",
    "GUEST_VENV",
    "INITRD",
    "INITRD_MODULES",
    "KERNEL",
    "KERNEL_CONFIG",
    "METADATA",
    "ROOT_LABEL",
    "SUITE",
    "TEE_GUEST_OPTIONS",
    "AptSource",
    "Image",
    "Recipe",
    "build_image",
    "debian_sources",
    "describe_image",
    "disk_format",
    "find_image",
    "host_apt_sources",
    "load_recipe",
    "parse_deb822",
    "parse_one_line",
    "recipe_folder",
    "recipe_hash",
    "recipe_inputs",
    "remove_tree",
    "tee_guest_problem",
    "tee_guest_support",
    "user_image",
]
