"""The locked masters' code disk is reproducible: the owner computes the same dm-verity root hash
from the same source on another machine, at another time, from another folder; and any change of
a byte of the source is another hash. (A first version was not: mkfs copied each file's access
and change times, which reading the tree and the clock move.)"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from orchestrator import codedisk

REPO = Path(__file__).resolve().parents[2]


def _copy(dest: Path) -> Path:
    shutil.copytree(REPO / "groupcover", dest / "groupcover",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return dest


def test_the_same_source_is_the_same_disk_elsewhere_and_later(tmp_path: Path) -> None:
    first = codedisk.build(tmp_path / "a.img", REPO)
    other = _copy(tmp_path / "elsewhere")
    time.sleep(1.1)  # another second: another change time for every copied file
    for path in (other / "groupcover").rglob("*.py"):  # read, so that atimes move
        path.read_bytes()
        os.utime(path, (time.time(), path.stat().st_mtime + 5))
    second = codedisk.build(tmp_path / "b.img", other)
    assert first.root_hash == second.root_hash and first.hash_offset == second.hash_offset
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    assert first.cmdline() == (f"gcvm.locked=1 gcvm.code={first.root_hash} "
                               f"gcvm.code_offset={first.hash_offset}")  # fmt: skip


def test_one_byte_of_the_source_is_another_disk(tmp_path: Path) -> None:
    other = _copy(tmp_path / "changed")
    jobs = other / "groupcover" / "agent" / "jobs.py"
    jobs.write_bytes(jobs.read_bytes().replace(b"MAX_ARGV = 200", b"MAX_ARGV = 201"))
    assert codedisk.build(tmp_path / "a.img", REPO).root_hash != \
        codedisk.build(tmp_path / "b.img", other).root_hash  # fmt: skip


def test_byte_code_is_not_on_the_disk(tmp_path: Path) -> None:
    other = _copy(tmp_path / "src")
    cache = other / "groupcover" / "__pycache__"
    cache.mkdir()
    (cache / "x.cpython-311.pyc").write_bytes(b"host-compiled code")
    assert codedisk.build(tmp_path / "a.img", REPO).root_hash == \
        codedisk.build(tmp_path / "b.img", other).root_hash  # fmt: skip
