"""`gcvm image info`: an image's facts as a table."""

from __future__ import annotations

from orchestrator import ui
from orchestrator.image.model import (
    Image,
    verity_root,
)


def describe_image(image: Image) -> None:
    """Print an image's facts (a table on stdout)."""
    from rich.table import Table

    table = Table(show_header=False, box=None)
    rows = [
        ("recipe hash", image.recipe_hash or "(user image)"),
        ("folder", str(image.root)),
        ("disk", f"{image.disk} ({image.disk_format})"),
        ("kernel", f"{image.kernel} ({image.kernel_version})" if image.kernel else "(own boot)"),
        ("initrd", str(image.initrd) if image.initrd else "-"),
        ("cmdline", image.cmdline or "-"),
        (
            "root",
            "read-only, dm-verity (root hash in cmdline), writable state in a tmpfs overlay"
            if verity_root(image)
            else "read-write disk (unmeasured)",
        ),
        ("python", f"{image.python} {image.python_version}".strip()),
        ("size", f"{image.size_bytes / 2**20:.0f} MiB"),
        ("built in", f"{image.built_seconds:.0f} s"),
        (
            "TEE guest support",
            ", ".join(
                f"{tee}: {'yes' if ok else 'no'}" for tee, ok in image.tee_guest_support.items()
            )
            or "unknown",
        ),
    ]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    ui.out.print(table)
