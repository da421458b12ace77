"""`gcvm render --runtime pods`: every target x TEE validated against the Kubernetes schemas
(1.31 and the newest that kubernetes-validate ships, strict: unknown fields fail), golden files
for two renders, and gcvm's own checks the schemas cannot make (runtime classes, annotation
keys, the initdata round trip and its digest recomputed here)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from orchestrator import ownerid
from orchestrator.errors import UsageError
from orchestrator.pods import initdata
from orchestrator.pods.manifests import KATA, PodsSpec, Target, documents, play_argv, render
from orchestrator.spec import Tee

GOLDEN = Path(__file__).parent / "golden" / "pods"
VERSIONS = ("1.31", kubernetes_validate.latest_version())
BROKER = "https://kbs.example:8080"
IMAGE = "localhost/gcvm-guest:test"
CASES = [(target, tee, coco) for target in Target for tee in Tee
         for coco in ((False, True) if tee is Tee.none else (False,))]  # fmt: skip


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> ownerid.OwnerIdentity:
    return ownerid.ensure(tmp_path_factory.mktemp("owner"))


def spec_for(target: Target, tee: Tee, coco: bool, owner: ownerid.OwnerIdentity | None,
             **kw: object) -> PodsSpec:  # fmt: skip
    broker = BROKER if (tee is not Tee.none or coco) else kw.pop("broker", None)
    return PodsSpec(name="demo", tee=tee, masters=2, workers=1, worker_gpu=True, target=target,
                    coco_dev=coco, broker=broker, owner=owner, image=IMAGE,
                    subnet="10.77.0.0/24", **kw)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize(("target", "tee", "coco"), CASES)
def test_every_object_validates_strictly(target: Target, tee: Tee, coco: bool,
                                         owner: ownerid.OwnerIdentity) -> None:  # fmt: skip
    docs = documents(render(spec_for(target, tee, coco, owner)))
    assert [d["kind"] for d in docs] == ["Namespace", "Pod", "Pod", "Pod", "Service", "Service"]
    for doc in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_an_unknown_field(owner: ownerid.OwnerIdentity) -> None:
    doc = documents(render(spec_for(Target.k8s, Tee.tdx, False, owner)))[1]
    doc["spec"]["runtimeClass"] = "kata-qemu-tdx"  # a typo the schema must refuse
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.31", strict=True)


@pytest.mark.parametrize(("tee", "coco", "expected"), [
    (Tee.tdx, False, "kata-qemu-tdx"), (Tee.sev_snp, False, "kata-qemu-snp"),
    (Tee.none, True, "kata-qemu-coco-dev"), (Tee.none, False, None),
])  # fmt: skip
def test_runtime_class_and_annotations(tee: Tee, coco: bool, expected: str | None,
                                       owner: ownerid.OwnerIdentity) -> None:  # fmt: skip
    pods = [d for d in documents(render(spec_for(Target.k8s, tee, coco, owner))) if
            d["kind"] == "Pod"]  # fmt: skip
    masters = [p for p in pods if p["metadata"]["labels"]["gcvm.dev/role"] == "master"]
    workers = [p for p in pods if p["metadata"]["labels"]["gcvm.dev/role"] == "worker"]
    for pod in masters:
        assert pod["spec"].get("runtimeClassName") == expected
        notes = pod["metadata"]["annotations"]
        if expected is not None:
            assert notes[KATA + "default_vcpus"] == "1"
            assert notes[KATA + "default_memory"] == "2048"
        assert set(notes) <= {KATA + "default_vcpus", KATA + "default_memory",
                              initdata.ANNOTATION}  # fmt: skip
        assert initdata.ANNOTATION in notes  # the owner's pins travel in initdata
    for pod in workers:  # plain runtime, one GPU
        assert "runtimeClassName" not in pod["spec"]
        assert "annotations" not in pod["metadata"]
        assert pod["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}


def test_initdata_round_trip_and_digest(owner: ownerid.OwnerIdentity) -> None:
    docs = documents(render(spec_for(Target.k8s, Tee.tdx, False, owner)))
    value = docs[1]["metadata"]["annotations"][initdata.ANNOTATION]
    raw = gzip.decompress(base64.b64decode(value, validate=True))
    parsed = tomllib.loads(raw.decode())
    assert parsed["version"] == "0.1.0" and parsed["algorithm"] == "sha384"
    aa = tomllib.loads(parsed["data"]["aa.toml"])
    cdh = tomllib.loads(parsed["data"]["cdh.toml"])
    pins = tomllib.loads(parsed["data"]["gcvm.toml"])
    assert aa["token_configs"]["kbs"]["url"] == BROKER
    assert cdh["kbc"] == {"name": "cc_kbc", "url": BROKER,
                          "kbs_cert": initdata.owner_cert_pem(owner)}  # fmt: skip
    assert pins == {"broker_cert": ownerid.b64url(owner.broker_cert),
                    "owner_key": ownerid.b64url(owner.owner_key)}  # fmt: skip
    digest = hashlib.sha384(raw).digest()
    made = initdata.Initdata(raw.decode())
    assert made.digest == digest and made.tdx_mr_config_id == digest
    assert made.snp_hostdata == digest[:32] and len(made.snp_hostdata) == 32
    # deterministic: the same inputs give the same annotation
    again = documents(render(spec_for(Target.k8s, Tee.tdx, False, owner)))
    assert again[1]["metadata"]["annotations"][initdata.ANNOTATION] == value


def test_seed_variables_and_rendezvous(owner: ownerid.OwnerIdentity) -> None:
    pods = render(spec_for(Target.k8s, Tee.tdx, False, owner)).pods
    env = [dict(p.env) for p in pods]
    assert [e["RANK"] for e in env] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in env} == {"3"}
    assert [e.get("WORKER") for e in env] == ["2", "2", None]
    assert env[0]["MASTER_ADDR"] is None  # rank 0 binds its own pod IP (fieldRef)
    assert env[1]["MASTER_ADDR"] == env[2]["MASTER_ADDR"] == "demo-rendezvous"
    assert "BROKER" not in env[0]  # the seed's built-in model needs no key
    assert pods[0].command == ["/opt/gcvm/venv/bin/tee_test_transformer_master.py"]


def test_podman_target_has_static_addresses_and_private_dns() -> None:
    made = render(spec_for(Target.podman, Tee.none, False, None))
    pods = [d for d in documents(made) if d["kind"] == "Pod"]
    for pod in pods:
        spec = pod["spec"]
        assert spec["dnsPolicy"] == "None" and spec["dnsConfig"] == {"nameservers": ["127.0.0.1"]}
        aliases = {h: a["ip"] for a in spec["hostAliases"] for h in a["hostnames"]}
        assert aliases["demo-rendezvous"] == aliases["demo-master0"] == "10.77.0.10"
        env = spec["containers"][0]["env"]
        assert all("valueFrom" not in e for e in env)  # podman refuses status.podIP
    assert "cc_init_data" not in str(pods)  # no broker, no owner: no initdata
    assert play_argv(made, "net") == ["podman", "kube", "play", "--network", "net", "--ip",
                                      "10.77.0.10", "--ip", "10.77.0.11", "--ip", "10.77.0.12",
                                      "play.yaml"]  # fmt: skip
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(made.files["play.yaml"])] == [
        "demo-master0", "demo-master1", "demo-worker0"]  # fmt: skip


@pytest.mark.parametrize("bad", [
    {"tee": Tee.tdx, "coco_dev": True, "broker": BROKER},
    {"tee": Tee.tdx},  # a confidential pod without a broker
    {"broker": "kbs.example"},
    {"port": 0},
])  # fmt: skip
def test_refusals(bad: dict) -> None:
    with pytest.raises(UsageError):
        PodsSpec(name="demo", **bad)


@pytest.mark.parametrize(
    ("case", "target", "tee"),
    [("k8s-tdx", Target.k8s, Tee.tdx), ("podman-none", Target.podman, Tee.none)],
)
def test_golden(case: str, target: Target, tee: Tee, request: pytest.FixtureRequest) -> None:
    # a fixed owner identity would need fixed keys: the goldens carry no owner
    made = render(spec_for(target, tee, False, None))
    folder = GOLDEN / case
    if request.config.getoption("--regen-golden"):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.yaml"):
            old.unlink()
        for name, text in made.files.items():
            (folder / name).write_text(text)
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(made.files)
    for name, text in made.files.items():
        assert (folder / name).read_text() == text, f"{case}/{name} differs: --regen-golden"


def test_cli_writes_the_files_and_prints_the_digest(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "render", "--runtime", "pods", "--tee", "sev-snp", "--masters", "1", "--workers", "1",
        "--broker", BROKER, "--owner", str(tmp_path / "owner"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    raw = initdata.decode(yaml.safe_load((out / "10-gcvm-master0.yaml").read_text())
                          ["metadata"]["annotations"][initdata.ANNOTATION])  # fmt: skip
    assert hashlib.sha384(raw.encode()).hexdigest()[:64] in result.output.replace("\n", "")
    bad = CliRunner().invoke(app, ["render", "--coco-dev", "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, UsageError) and "--runtime pods" in str(bad.exception)


def test_render_refuses_an_object_the_schema_rejects(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.errors import GcvmError
    from orchestrator.pods import render_cmd

    made = render(spec_for(Target.k8s, Tee.none, False, None))
    made.files["10-demo-worker0.yaml"] += "bogus: 1\n"
    with pytest.raises(GcvmError, match=r"not a valid Kubernetes 1\.31 object"):
        render_cmd.validate(made)
