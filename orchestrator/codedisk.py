"""A locked master's framework code: a small read-only disk under dm-verity, made from the
checkout's `groupcover/` package, whose root hash the master's kernel command line carries.

Why a disk of its own, not the code baked into the image: the image (kernel, torch, the venv,
~1.3 GiB) changes rarely and takes minutes to build; the framework changes with every commit and
this disk takes a second. Both are measured the same way: each root hash is on the kernel command
line (`gcvm.verity=` for the root, `gcvm.code=` for this), which SEV-SNP's kernel hashes and TDX's
RTMR2 cover, and every block the guest reads is checked against it (`images/rootfs/usr/local/
sbin/gcvm-code` opens it). A host that changes one byte gets a read error in the guest, never
changed code; a host that changes the hash launches a guest the owner's policy does not accept.

The build is reproducible (fixed file times, owners, modes, file system UUID and hash seed,
dm-verity salt and UUID derived from the content), so the owner computes the same root hash from
the same source on their own machine (`gcvm attest policy --locked`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import GcvmError

PACKAGE = "groupcover"
LABEL = "gcvm-code"
SERIAL = "gcvm-code"  # the guest finds the disk as /dev/disk/by-id/virtio-gcvm-code
EPOCH = 1_700_000_000  # every file's time on the disk (any fixed value)
BLOCK = 4096


class CodeDiskError(GcvmError):
    pass


@dataclass(frozen=True)
class CodeDisk:
    path: Path
    root_hash: str
    hash_offset: int

    def cmdline(self) -> str:
        """What a locked master's kernel command line says of it (and that it is locked)."""
        return f"gcvm.locked=1 gcvm.code={self.root_hash} gcvm.code_offset={self.hash_offset}"


def _copy_tree(src: Path, dest: Path) -> str:
    """The package's files (no byte code) into `dest`, times and modes fixed; returns a digest
    of every path and content, from which the disk's identifiers are derived."""
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo") or path.is_symlink():
            continue
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        target.write_bytes(data)
        digest.update(str(rel).encode() + b"\0" + hashlib.sha256(data).digest())
    for path in [dest, *dest.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    return digest.hexdigest()


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise CodeDiskError(f"{argv[0]} failed while making the code disk: "
                            f"{(proc.stderr or proc.stdout).strip()[-400:]}")  # fmt: skip


def _fix_times(raw: Path, tree: Path, script: Path) -> None:
    """Every inode's access and change times set to EPOCH. mkfs.ext4 -d copies them from the
    tree, where reading a file (mkfs does) may set its atime, and the change time is the moment
    the tree was made: left alone, two builds of the same source a second apart differ."""
    paths = ["/", "/lost+found"] + [f"/{p.relative_to(tree).as_posix()}" for p in
                                    sorted(tree.rglob("*"))]  # fmt: skip
    script.write_text("".join(f'sif "{p}" {field} @{EPOCH}\n' for p in paths
                              for field in ("atime", "ctime")))  # fmt: skip
    _run(
        ["debugfs", "-w", "-f", str(script), str(raw)],
        {**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH)},
    )


def build(out: Path, source: Path) -> CodeDisk:
    """The code disk of `source`/groupcover at `out` (raw: the file system, then its hash tree)."""
    if not (source / PACKAGE / "__init__.py").is_file():
        raise CodeDiskError(f"{source} holds no {PACKAGE}/ package to put on the code disk")
    for tool in ("mkfs.ext4", "debugfs", "veritysetup"):
        if shutil.which(tool) is None:
            raise CodeDiskError(
                f"{tool} is missing", hint="apt-get install e2fsprogs cryptsetup-bin"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gcvm-code-") as tmp:
        tree = Path(tmp) / "tree"
        content = _copy_tree(source / PACKAGE, tree / PACKAGE)
        os.utime(tree, (EPOCH, EPOCH))
        size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
        mib = (size * 2 + (8 << 20)) // (1 << 20)
        fs_uuid = str(uuid.UUID(content[:32]))
        raw = Path(tmp) / "code.raw"
        env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH)}
        _run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-U", fs_uuid, "-b", str(BLOCK),
              "-O", "^has_journal", "-E", f"root_owner=0:0,hash_seed={fs_uuid}",
              "-d", str(tree), str(raw), f"{mib}M"], env)  # fmt: skip
        _fix_times(raw, tree, Path(tmp) / "times.debugfs")
        offset = mib << 20
        hash_file = Path(tmp) / "root.hash"
        _run(["veritysetup", "format", f"--data-blocks={offset // BLOCK}",
              f"--hash-offset={offset}", f"--salt={content}",
              f"--uuid={uuid.UUID(content[32:])}", f"--root-hash-file={hash_file}",
              str(raw), str(raw)])  # fmt: skip
        root_hash = hash_file.read_text().strip()
        tmp_out = out.with_name(f".{out.name}.tmp")
        shutil.move(str(raw), tmp_out)
        os.chmod(tmp_out, 0o644)
        os.replace(tmp_out, out)
    return CodeDisk(out, root_hash, offset)
