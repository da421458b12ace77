"""The benchmark: statistics, interleaving, the result document, and the two local front ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from groupcover.bench import report, stats
from groupcover.bench.run import benchmark, run_interleaved
from groupcover.inprocess import InProcessTransport
from groupcover.models import as_tensor, load_model
from groupcover.package.prepare import Prepared
from tests.unit.conftest import SMALL_BERT
from tests.unit.transports import free_port

RESULT_KEYS = {"model", "mode", "batch", "seq", "latency_ms", "throughput", "max_abs_err",
               "rel_err", "cosine_min", "breakdown_ms", "rpc_calls", "bytes_per_forward",
               "mask_offline_s"}  # fmt: skip
BREAKDOWN_KEYS = {"master_compute", "transfer", "worker_compute", "deobfuscation"}


def test_quantiles_interpolate() -> None:
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert stats.quantile(values, 0.5) == 3.0
    assert stats.quantile(values, 0.1) == pytest.approx(1.4)
    assert stats.quantile(values, 0.9) == pytest.approx(4.6)
    assert stats.quantile([7.0], 0.9) == 7.0


def test_errors_against_the_reference() -> None:
    ref = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    out = ref + torch.tensor([[0.0, 0.1], [0.0, -0.2]])
    errs = stats.errors(out, ref)
    assert errs["max_abs_err"] == pytest.approx(0.2)
    assert errs["rel_err"] == pytest.approx(0.2 / 4.0)
    assert 0.99 < errs["cosine_min"] < 1.0
    assert stats.errors(ref, ref)["rel_err"] == 0.0


def test_model_outputs_are_reduced_to_their_main_tensor() -> None:
    t = torch.ones(2)
    assert as_tensor(t) is t
    assert as_tensor((t, torch.zeros(1))) is t
    assert as_tensor({"last_hidden_state": t}) is t
    with pytest.raises(TypeError):
        as_tensor(3)


class _Recorder(nn.Module):
    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return x


def test_modes_are_interleaved_after_warmup() -> None:
    log: list[str] = []
    runs = [stats.ModeRun(m, _Recorder(m, log), InProcessTransport(), 0.0) for m in "abc"]
    run_interleaved(runs, (torch.ones(1, 1),), repeat=2, warmup=2)
    assert log == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 2
    assert all(len(run.latencies_s) == 2 for run in runs)  # warmup is not timed


def test_benchmark_document_over_the_in_process_transport() -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = tuple(example(3, 16))
    with torch.no_grad():
        reference = model(*inputs)
    prepared = Prepared(model, inputs, reference, 0.0)
    modes = ("plain-offload", "groupcover", "tee-only")
    results = benchmark(
        prepared, modes, lambda mode: InProcessTransport(owner=mode), model_name="bert-base",
        batch=3, seq=16, repeat=3, warmup=1, seed=0, audit=True, verify=False,
    )  # fmt: skip
    assert [r["mode"] for r in results] == list(modes)
    for r in results:
        assert r.keys() >= RESULT_KEYS
        assert set(r["breakdown_ms"]) == BREAKDOWN_KEYS
        lat = r["latency_ms"]
        assert 0 < lat["p10"] <= lat["median"] <= lat["p90"]
        assert r["throughput"] == pytest.approx(3 / (lat["median"] / 1e3))
        assert r["rel_err"] < 1e-4
        assert r["repeat"] == 3
    plain, gc, tee = results
    assert plain["rpc_calls"] == gc["rpc_calls"] == 4 * SMALL_BERT["layers"]
    assert tee["rpc_calls"] == 0 and tee["bytes_per_forward"] == 0
    assert gc["mask_offline_s"] > 0 and plain["mask_offline_s"] is None
    # topped up between forwards: every timed forward found its pairs ready, none drawn online
    assert gc["mask_online_refill_s"] == 0.0
    assert gc["masks"]["used"] == gc["masks"]["offline"]["pairs"] - gc["masks"]["left"]
    assert gc["masks"]["left"] == 4 * SMALL_BERT["layers"]  # one pair ahead per layer, no more
    assert gc["audit"]["leaks"] == [] and plain["audit"]["leaks"]
    assert plain["protected"] is False and plain["protection"] == "unprotected (no masks)"
    assert gc["protected"] is True and tee["protected"] is None
    assert report.overheads(results)["plain-offload"] == 1.0
    # the audit saw only its own untimed forward: none of the warmup or timed ones
    assert gc["audit"]["audited_calls"] == 4 * SMALL_BERT["layers"]
    assert gc["audit"]["check_s"] > 0
    for r in (plain, gc, tee):  # the chart's stacked parts add up to the median it draws
        assert sum(r["breakdown_ms"].values()) == pytest.approx(r["latency_ms"]["median"], rel=1e-6)
    # sustained throughput counts the masks each forward needs; unmasked modes need none
    assert gc["mask_generation_ms"] > 0 and plain["mask_generation_ms"] == 0
    assert gc["sustained_throughput"] < gc["throughput"]
    assert plain["sustained_throughput"] == plain["throughput"]
    assert gc["paired_ratios"]["plain-offload"]["pairs"] == 3
    assert gc["cpu_ms"]["median"] > 0
    assert gc["integrity_ms"] is None and gc["secrets"].startswith("secrets reproducible")
    # unchecked results say so; tee-only has no worker results to check
    assert gc["results_checked"] is False and plain["results_checked"] is False
    assert gc["integrity_check"].startswith("results NOT checked (--no-verify)")
    assert tee["results_checked"] is None
    # the speed-up bounds over tee-only of the same run, from the master's CPU per forward
    assert tee["speedup_bound"] == 1.0 and tee["speedup_bound_note"] is None
    cpu = gc["cpu_ms"]["median"]
    assert gc["speedup_bound"] == pytest.approx(tee["cpu_ms"]["median"] / cpu)
    assert gc["speedup_bound_sustained"] == pytest.approx(
        tee["cpu_ms"]["median"] / (cpu + gc["mask_generation_ms"])
    )


def test_verify_reports_the_integrity_checks_cost(capsys: pytest.CaptureFixture[str]) -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = tuple(example(2, 8))
    with torch.no_grad():
        reference = model(*inputs)
    prepared = Prepared(model, inputs, reference, 0.0)
    [result] = benchmark(  # results are checked by default
        prepared, ("groupcover",), lambda mode: InProcessTransport(owner=mode),
        model_name="bert-base", batch=2, seq=8, repeat=2, warmup=0, seed=None, audit=False,
    )  # fmt: skip
    assert result["integrity_ms"] > 0
    assert result["integrity"]["checked"] >= 2 * 4 * SMALL_BERT["layers"]
    assert result["results_checked"] is True
    label = result["integrity_check"]
    assert label.startswith("results checked (Freivalds: every element of every result")
    assert "false-accept" in label and "2^-52" in label  # masked: float64 secret vectors
    assert "one quantum x sum |s|" in label  # masked: results checked in whole quanta mod 2^32
    # about sum |s| quanta of a result: 5e-6 to 1.6e-5 here (measured), float32 unmasked 4e-4
    assert 0 < result["integrity"]["loosest_tolerance"] < 1e-4
    report.print_table({"results": [result]})
    printed = capsys.readouterr().out
    assert f"groupcover: {label}" in printed
    # no tee-only in this run: no bounds, and the table says why
    assert result["speedup_bound"] is None and result["speedup_bound_sustained"] is None
    assert "tee-only did not run" in result["speedup_bound_note"]
    assert "no speed-up bounds: tee-only did not run" in printed
    assert result["secrets"] == report.secrets_label(None) and "OS CSPRNG" in result["secrets"]


def _groupcover(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "groupcover", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bench_local_runs_two_processes_and_writes_the_document(tmp_path: Path) -> None:
    out = tmp_path / "minilm.json"
    proc = _groupcover("bench", "--local", "--model", "minilm", "--modes",
                       "plain-offload,groupcover", "--batch", "2", "--seq", "8", "--repeat", "2",
                       "--json", str(out), "--timeout", "60")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"{report.RESULT_MARK} {out.resolve()}"
    document = json.loads(out.read_text())
    assert {"platform", "cpu_model", "threads", "torch", "hostname"} <= document["host"].keys()
    assert document["host"]["threads"] == 1
    assert document["settings"]["force_tcp"] is True
    assert document["settings"]["transport"] == "tcp"  # the default: tensors only
    assert "transport_warning" not in document["settings"]
    plain, gc = document["results"]
    for r in (plain, gc):
        assert r.keys() >= RESULT_KEYS
        assert (r["batch"], r["seq"], r["rank"], r["worker"]) == (2, 8, 0, 1)
        assert r["rel_err"] < 1e-4 and r["cosine_min"] > 0.9999
        assert r["breakdown_ms"]["worker_compute"] > 0
        assert r["transport"] == "tcp" and "transport_warning" not in r
    assert "vs plain-offload" in proc.stdout
    assert "transport: tcp" in proc.stdout and "WARNING" not in proc.stdout


@pytest.mark.slow
def test_bench_micro_reports_restore_against_linear(tmp_path: Path) -> None:
    out = tmp_path / "micro.json"
    proc = _groupcover("bench", "--micro", "--batch", "1", "--seq", "8", "--repeat", "5",
                       "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "restore / plain linear, all shapes:" in proc.stdout
    document = json.loads(out.read_text())
    summary = document["summary"]
    assert summary["ratio"] == pytest.approx(summary["restore_ms"] / summary["linear_ms"])
    assert len(document["micro"]) == 3


@pytest.mark.slow
def test_two_masters_launch_against_one_worker(tmp_path: Path) -> None:
    """World of 3 through the real entry point: masters 0 and 1 share worker 2."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "groupcover", "launch", "--world-size", "3", "--master-addr",
            "127.0.0.1", "--master-port", port, "--ifname", "lo", "--force-tcp",
            "--timeout", "60"]  # fmt: skip
    workload = ["--model", "minilm", "--modes", "plain-offload,groupcover", "--batch", "1",
                "--seq", "8", "--repeat", "2"]  # fmt: skip
    procs = [subprocess.Popen([*base, "--role", "worker", "--rank", "2"], env=env)]
    for rank in (0, 1):
        argv = [*base, "--role", "master", "--rank", str(rank), "--worker", "2", *workload,
                "--json", str(tmp_path / f"rank{rank}.json")]  # fmt: skip
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    try:
        for proc in procs[1:]:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0
            assert out.strip().splitlines()[-1].startswith(report.RESULT_MARK)
        assert procs[0].wait(timeout=60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())["results"]
        assert [(r["rank"], r["worker"], r["mode"]) for r in results] == [
            (rank, 2, "plain-offload"),
            (rank, 2, "groupcover"),
        ]
        assert all(r["rel_err"] < 1e-4 for r in results)


def test_default_json_path_names_a_package_by_its_folder(tmp_path, monkeypatch) -> None:
    """`bench --model /some/dir` without --json writes ./groupcover-dir-rank0.json, never
    ./groupcover-/some/dir-rank0.json (folders created under the working directory)."""
    monkeypatch.chdir(tmp_path)
    written = report.write_json({}, None, str(tmp_path / "pkg x"), 0)
    assert written == tmp_path / "groupcover-pkg-x-rank0.json"
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_every_unmasked_mode_says_unprotected_in_its_result_and_table() -> None:
    """Each mode that offloads without masks (plain-offload, groupcover-nomask, hardened-nomask)
    is labelled unprotected in its JSON (`protected: false`) and in the printed table and notes;
    masked modes are protected; tee-only offloads nothing."""
    from groupcover.bench.report import mode_label, protection_lines
    from groupcover.bench.stats import mode_protection
    from groupcover.modes import MODES, mode_settings

    unmasked = {m for m in MODES if mode_settings(m)[0] is not None and not mode_settings(m)[1]}
    assert unmasked == {"plain-offload", "groupcover-nomask", "hardened-nomask"}
    for mode in MODES:
        facts = mode_protection(mode)
        row = {"mode": mode, **facts}
        if mode in unmasked:
            assert facts == {"protected": False, "protection": "unprotected (no masks)"}
            assert mode_label(row) == f"{mode} UNPROTECTED"
            assert protection_lines([row])[0].startswith(f"{mode}: unprotected (no masks)")
        else:
            assert facts["protected"] is (None if mode == "tee-only" else True)
            assert mode_label(row) == mode and protection_lines([row]) == []
