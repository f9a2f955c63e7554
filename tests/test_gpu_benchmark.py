"""benchmarks/gpu.py (issue 12's GPU figures) in its --smoke sizes on the CPU: every section
runs and reports finite, positive figures, and a failing section costs no other section's
figures. The GPU run itself is a device check (docs/performance.md)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(180)

SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _positive(row: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """The script's --smoke run on the CPU, once for the cases below: its JSON document."""
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu-bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--no-compile",
                           "--peak-tflops", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_smoke_run_on_cpu_completes_every_section(smoke):
    assert smoke["ok"] and smoke["device"].startswith("cpu") and smoke["torch"] == torch.__version__ and smoke["date"]
    sections = smoke["sections"]
    assert list(sections) == ["attack", "purify", "noise", "replicas", "checkpoint"]
    for name, sec in sections.items():
        assert sec["error"] is None and sec["rows"], name
        assert not [r for r in sec["rows"] if "error" in r], name


def test_attack_section_times_each_model_and_precision(smoke):
    attack = smoke["sections"]["attack"]["rows"]
    assert {(r["model"], r["mode"]) for r in attack} == {
        (m, mode) for m in ("wrn-10-1", "resnet50@32") for mode in ("fp32", "bf16", "bf16+cl")}
    for r in attack:
        _positive(r, "step_ms", "img_steps_s", "attacks_s", "gflop_per_step", "tflops", "frac_peak")
        assert r["frac_peak"] <= 1.0 and r["peak_mib"] is None  # 1 TFLOP/s given; no CUDA memory on a CPU
        assert r["img_steps_s"] == pytest.approx(r["batch"] * r["steps"] / r["attack_s"])


def test_purify_section_records_the_network_dtype_and_nfe(smoke):
    purify = {(r["purifier"], r["mode"]): r for r in smoke["sections"]["purify"]["rows"]}
    for r in purify.values():
        _positive(r, "call_ms", "steps_s", "row_steps_s")
    assert purify[("langevin-ebm", "bf16")]["net_dtype"] == "bf16"
    assert purify[("adp-small", "fp32+cl")]["net_dtype"] == "fp32" and purify[("adp-small", "fp32")]["nfe_per_row"] == 2


def test_noise_and_replica_sections_draw_the_same_keyed_noise_however_batched(smoke):
    for r in smoke["sections"]["noise"]["rows"]:
        _positive(r, "step_ms", "keyed_ms", "share", "randn_ms", "keyed_randn")
    for r in smoke["sections"]["replicas"]["rows"]:
        _positive(r, "batched_ms", "loop_ms", "loop_batched")
        assert r["max_diff"] < 1e-4  # the same keyed draws whichever way the rows are batched


def test_checkpoint_section_runs_each_chain_length_with_and_without_checkpoints(smoke):
    ckpt = smoke["sections"]["checkpoint"]["rows"]
    assert [(r["k"], r["mode"]) for r in ckpt] == [(2, "none"), (2, "auto"), (4, "none"), (4, "auto")]
    for r in ckpt:
        assert r["status"] == "ok"
        _positive(r, "seconds")


def test_a_failing_section_keeps_the_others(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)

    def broken(args, dev, report):
        report.start("noise", ["net"])
        raise RuntimeError("planted")

    monkeypatch.setitem(gpu.RUNNERS, "noise", broken)
    monkeypatch.setattr(gpu.defense, "COMPILE_BACKEND", gpu.defense.COMPILE_BACKEND)  # main sets it on a CPU
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "partial.json"
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--device", "cpu", "--smoke", "--only", "noise", "replicas",
                                      "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        assert gpu.main() == 1
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(out.read_text())
    assert not doc["ok"] and doc["sections"]["noise"]["error"] == "RuntimeError: planted"
    replicas = doc["sections"]["replicas"]
    assert replicas["error"] is None and len(replicas["rows"]) == 2
