"""What gcvm writes on the host for a cluster: what `gcvm scan --cluster` adds."""

from __future__ import annotations

from pathlib import Path

# state keys that name paths gcvm does not write for the cluster: the checkout and its venv (the
# host worker's), and the owner's own folder and policy file (the cluster broker's record: the
# source checkpoint, the keys and the broker's log live there, by design)
NOT_WRITTEN = frozenset({"python", "root", "owner", "policy", "broker_policy"})


def host_files(cluster: str) -> list[Path]:
    """Every folder and file gcvm writes on the host for a cluster: its state folder (state,
    overlays, seed disks, serial logs, keys, the host worker's folder), its results folder,
    the image it runs (disk, kernel, initrd), and every path its state names (but the checkout
    and its venv, which the host worker runs from). Not here: the model package the user gave
    `gcvm run` (name it to the scan) and the owner's folder (source checkpoint, key, broker)."""
    from orchestrator import paths, state

    found: dict[Path, None] = {}

    def add(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in NOT_WRITTEN:
                    add(item)
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)
        elif isinstance(value, str | Path) and str(value).startswith("/"):
            path = Path(value)
            if path.exists() and path not in (Path("/"),) and not _is_system(path):
                found[path] = None

    add(state.cluster_dir(cluster))
    add(paths.state_root() / "results" / cluster)
    if state.exists(cluster):
        st = state.load(cluster)
        add(st.to_dict())
        disk = Path(str(st.image.get("disk") or "/nonexistent"))
        if disk.parent.parent == paths.images_dir():  # the image's folder: kernel, initrd
            add(disk.parent)
    return list(found)


def _is_system(path: Path) -> bool:
    """Paths a state names that gcvm does not write (interpreters, sockets, /dev, /proc)."""
    text = str(path)
    return text.startswith(("/dev", "/proc", "/sys", "/usr", "/bin", "/sbin", "/lib", "/etc")) or (
        path.exists() and not (path.is_file() or path.is_dir())
    )
