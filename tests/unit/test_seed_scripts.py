"""The seed's console scripts on loopback, driven by the seed's own environment variables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from groupcover.launch import Role
from groupcover.seed_scripts import settings_from_env, summary_lines
from tests.unit.transports import free_port

BIN = Path(sys.executable).parent
SEED_ENV = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555", "WORLD_SIZE": "3",
            "GLOO_SOCKET_IFNAME": "virbr0", "TP_SOCKET_IFNAME": "virbr0"}  # fmt: skip


def test_environment_maps_onto_rank_settings() -> None:
    env = {**SEED_ENV, "RANK": "1", "WORKER": "2", "BATCH": "4", "SEQ": "16", "REPEAT": "7"}
    settings = settings_from_env(Role.master, env)
    assert (settings.rank, settings.world_size, settings.worker) == (1, 3, 2)
    assert (settings.master_addr, settings.master_port, settings.ifname) == ("10.1.2.3", 29555,
                                                                             "virbr0")  # fmt: skip
    assert (settings.model, settings.modes) == ("seed-transformer", ("groupcover",))
    assert (settings.batch, settings.seq, settings.repeat) == (4, 16, 7)
    assert settings.verify  # every result checked unless VERIFY=0
    assert not settings_from_env(Role.master, {**env, "VERIFY": "0"}).verify
    worker = settings_from_env(Role.worker, {**SEED_ENV, "RANK": "2"})
    assert (worker.role, worker.worker) == (Role.worker, None)


def test_summary_prints_the_real_batch() -> None:
    result = {"model": "seed-transformer", "mode": "groupcover", "rank": 0, "worker": 1,
              "batch": 2, "seq": 32, "latency_ms": {"median": 500.0, "p10": 450.0, "p90": 550.0},
              "throughput": 4.0, "rel_err": 1e-6}  # fmt: skip
    (line,) = summary_lines({"results": [result]})
    assert "batch 2 x seq 32" in line and "throughput 4.000 samples/s" in line


@pytest.mark.slow
def _run_seed_scripts(tmp_path: Path, timeout: int, worker_env: dict[str, str],
                      master_env: dict[str, str]) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The seed's worker and master scripts on loopback at batch 1 x seq 8, one timed forward
    (results in tmp_path/seed.json); the master's completed process, both having exited 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo",
           "TP_SOCKET_IFNAME": "lo", "BATCH": "1", "SEQ": "8", "REPEAT": "1", "WARMUP": "0",
           "TIMEOUT": str(timeout), "JSON": str(tmp_path / "seed.json")}  # fmt: skip
    worker = subprocess.Popen([BIN / "tee_test_transformer_worker.py"],
                              env={**env, "RANK": "1", **worker_env})  # fmt: skip
    try:
        master = subprocess.run([BIN / "tee_test_transformer_master.py"],
                                env={**env, "RANK": "0", "WORKER": "1", **master_env},
                                capture_output=True, text=True, timeout=400)  # fmt: skip
        assert master.returncode == 0, master.stderr
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    return master


def test_seed_scripts_on_loopback(tmp_path: Path) -> None:
    """The full-size seed transformer at batch 1 x seq 8, one timed forward, GroupCover mode."""
    # TIMEOUT covers the worker's wait while the master protects the seed's transformer on the
    # fly (25 s alone here, minutes on a loaded host)
    master = _run_seed_scripts(tmp_path, 400, {}, {})
    line = master.stdout.strip().splitlines()[-1]
    match = re.search(r"batch (\d+) x seq 8: latency ([\d.]+) ms .* throughput ([\d.]+)", line)
    assert match, master.stdout
    batch, latency_ms, throughput = int(match[1]), float(match[2]), float(match[3])
    assert batch == 1
    assert throughput == pytest.approx(batch / (latency_ms / 1e3), rel=1e-2)
    (result,) = json.loads((tmp_path / "seed.json").read_text())["results"]
    assert (result["worker"], result["rank"], result["mode"]) == (1, 0, "groupcover")
    assert result["rel_err"] < 1e-4
    assert result["rpc_calls"] > 0 and result["breakdown_ms"]["worker_compute"] > 0


def test_package_variables_map_onto_rank_settings(tmp_path: Path) -> None:
    env = {**SEED_ENV, "RANK": "0", "WORKER": "1", "MODEL": "/p/a,/p/b", "KEY_FILE": "/k/a,/k/b",
           "BROKER": "http://10.0.0.1:8080", "TEE": "snp"}  # fmt: skip
    master = settings_from_env(Role.master, env)
    assert (master.model, master.extra_models) == ("/p/a", ("/p/b",))
    assert (master.key_file, master.extra_key_files) == (Path("/k/a"), (Path("/k/b"),))
    assert (master.broker, master.tee) == ("http://10.0.0.1:8080", "snp")
    assert master.broker_cert is None and master.owner_key is None
    pinned = settings_from_env(Role.master, {**env, "BROKER_CERT": "/pins/broker.pem",
                                             "OWNER_KEY": "/pins/owner.pub"})  # fmt: skip
    assert (pinned.broker_cert, pinned.owner_key) == (Path("/pins/broker.pem"),
                                                      Path("/pins/owner.pub"))  # fmt: skip
    worker = settings_from_env(Role.worker, {**SEED_ENV, "RANK": "1", "PACKAGE": "/p/a, /p/b"})
    assert worker.packages == (Path("/p/a"), Path("/p/b"))


def test_seed_scripts_run_a_package(tmp_path: Path) -> None:
    """MODEL/KEY_FILE for the master, PACKAGE for the worker: the seed's scripts run the
    package protected offline (nothing obfuscated at start-up), exact against its sealed
    reference for the batch they run."""
    package = tmp_path / "pkg"
    protect = subprocess.run([sys.executable, "-m", "groupcover", "protect", "seed-transformer",
                              "--out", str(package), "--scheme", "groupcover", "--reference",
                              "1x8"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert protect.returncode == 0, protect.stderr
    _run_seed_scripts(tmp_path, 120, {"PACKAGE": str(package)},
                      {"MODEL": str(package), "KEY_FILE": str(package / "model.key")})  # fmt: skip
    document = json.loads((tmp_path / "seed.json").read_text())
    (result,) = document["results"]
    assert result["mode"] == "groupcover" and result["rel_err"] < 1e-4
    assert "key file" in document["settings"]["key_release"]["label"]
