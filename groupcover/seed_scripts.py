"""The seed harness's console scripts, driven by its environment variables, run through `launch`.

    RANK=i WORLD_SIZE=j WORKER=k MASTER_ADDR=A MASTER_PORT=P tee_test_transformer_master.py
    RANK=i WORLD_SIZE=j MASTER_ADDR=A MASTER_PORT=P tee_test_transformer_worker.py

`GLOO_SOCKET_IFNAME`/`TP_SOCKET_IFNAME` name the interface; optional `BATCH`, `SEQ`, `REPEAT`,
`WARMUP`, `MODES`, `TIMEOUT`, `THREADS`, `JSON`, `FORCE_TCP` (1: no shared-memory transport),
`VERIFY` (0: the worker's results are NOT checked; by default every one is), `MASK_WORKER`
(the `-2w` modes: the rank of a second worker, not colluding with WORKER's, for the masks'
products).
The master runs the seed's transformer with
GroupCover against worker WORKER (never itself) and prints latency and throughput for the batch
it really ran. Several masters may name the same worker.

Model packages (`protect`): `MODEL` names the master's package folders (comma-separated; the
default is the seed's built-in transformer, protected in memory), opened with the key in
`KEY_FILE` (comma-separated, one per package) or released by the KBS broker at `BROKER` for the
evidence of `TEE` (none, snp or tdx); a worker loads the published weights of the folders in
`PACKAGE` (comma-separated). `BROKER_CERT` and `OWNER_KEY` name the broker's certificate and the
owner's public key where the measured boot pins none (`--broker-cert`, `--owner-key`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from groupcover.errors import GroupCoverError, UsageError, print_error
from groupcover.launch import RankSettings, Role, launch
from groupcover.rendezvous import Rendezvous

SEED_MODEL = "seed-transformer"
DEFAULTS = {"BATCH": 2, "SEQ": 32, "REPEAT": 3, "WARMUP": 1, "TIMEOUT": 300, "THREADS": 1}


def _int(env: Mapping[str, str], name: str) -> int:
    text = env.get(name) or str(DEFAULTS[name])
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not an integer") from None


def settings_from_env(role: Role, env: Mapping[str, str]) -> RankSettings:
    rendezvous = Rendezvous.from_env(env, timeout_s=float(_int(env, "TIMEOUT")))
    worker = mask_worker = None
    if role is Role.master:
        mask_worker = _rank(env, "MASK_WORKER")
        if not env.get("WORKER"):
            raise UsageError(
                "WORKER is not set", hint="set WORKER to the rank of the worker to offload to"
            )
        try:
            worker = int(env["WORKER"])
        except ValueError:
            raise UsageError(f"WORKER={env['WORKER']!r} is not an integer") from None
    modes = tuple(m for m in env.get("MODES", "groupcover").split(",") if m)
    json_path = Path(env.get("JSON") or f"groupcover-{SEED_MODEL}-rank{rendezvous.rank}.json")
    models = _list(env, "MODEL") or [SEED_MODEL]
    keys = [Path(k) for k in _list(env, "KEY_FILE")]
    return RankSettings(
        role=role,
        rank=rendezvous.rank,
        world_size=rendezvous.world_size,
        master_addr=rendezvous.master_addr,
        master_port=rendezvous.master_port,
        worker=worker,
        mask_worker=mask_worker,
        ifname=rendezvous.ifname,
        model=models[0],
        extra_models=tuple(models[1:]),
        key_file=keys[0] if keys else None,
        extra_key_files=tuple(keys[1:]),
        broker=env.get("BROKER") or None,
        tee=env.get("TEE") or None,
        # the pins, where the measured boot gives none (a runc pod); a measured pin wins
        broker_cert=Path(env["BROKER_CERT"]) if env.get("BROKER_CERT") else None,
        owner_key=Path(env["OWNER_KEY"]) if env.get("OWNER_KEY") else None,
        packages=tuple(Path(p) for p in _list(env, "PACKAGE")),
        modes=modes,
        batch=_int(env, "BATCH"),
        seq=_int(env, "SEQ"),
        repeat=_int(env, "REPEAT"),
        warmup=_int(env, "WARMUP"),
        json_path=json_path,
        force_tcp=env.get("FORCE_TCP", "") not in ("", "0"),  # gcvm run seed: TCP between VMs
        timeout_s=rendezvous.timeout_s,
        threads=_int(env, "THREADS"),
        verify=env.get("VERIFY", "1").strip() not in ("0", "false", "no"),
    )


def _rank(env: Mapping[str, str], name: str) -> int | None:
    if not env.get(name):
        return None
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"{name}={env[name]!r} is not an integer") from None


def _list(env: Mapping[str, str], name: str) -> list[str]:
    return [item.strip() for item in env.get(name, "").split(",") if item.strip()]


def summary_lines(document: dict) -> list[str]:
    """The seed's printout, with the batch that was really run (the public code printed 512)."""
    lines = []
    for r in document["results"]:
        lines.append(
            f"{r['model']} {r['mode']}: rank {r['rank']} -> worker{r['worker']}, "
            f"batch {r['batch']} x seq {r['seq']}: latency {r['latency_ms']['median']:.1f} ms "
            f"(p10 {r['latency_ms']['p10']:.1f}, p90 {r['latency_ms']['p90']:.1f}), "
            f"throughput {r['throughput']:.3f} samples/s, rel err "
            + ("not checked" if r.get("rel_err") is None else f"{r['rel_err']:.1e}")
        )
    return lines


def _main(role: Role) -> int:
    try:
        settings = settings_from_env(role, os.environ)
    except GroupCoverError as exc:
        print_error(exc)
        return exc.exit_code
    code = launch(settings)
    if code == 0 and role is Role.master and settings.json_path is not None:
        document = json.loads(settings.json_path.read_text())
        for line in summary_lines(document):
            print(line, flush=True)
    return code


def master_main() -> None:
    sys.exit(_main(Role.master))


def worker_main() -> None:
    sys.exit(_main(Role.worker))
