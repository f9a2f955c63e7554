"""Reports of committed runs: only marked files are read, paired comparisons between runs,
the RobustBench export, the CLI, and no torch on the report's import path."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import binomtest

from pipeline import report
from pipeline.cli import main
from pipeline.report import build, robustbench
from pipeline.run import commit
from pipeline.run.commit import CommitError
from tests.test_report import _row

ROOT = Path(__file__).resolve().parents[1]


def _commit_run(out, robust_keys: dict[int, set], n=40, shards=2, purifier="dae", checks=None):
    """A run of `n` samples over `shards` shards; attack i leaves `robust_keys[i]` robust."""
    per = n // shards
    for s in range(shards):
        rows = [_row(f"k{i}", idx, eps=0.1, gradient="full" if idx == 0 else "bpda", shard=f"shard-{s}",
                     correct=i in keys, purifier=purifier, classifier="cnn", runs=2)
                for i in range(s * per, (s + 1) * per) for idx, keys in robust_keys.items()]
        commit.commit_records(str(out), "evaluate", f"shard-{s}", rows,
                              {"source": f"/data/shard-{s}.tar", "samples": per, "config_hash": "h",
                               "seconds": 1.5, "host": "h1", "device": "cpu", "checks": checks or {}})
    return str(out)


def test_reads_only_marked_files_and_verifies_them(tmp_path):
    run = _commit_run(tmp_path / "r", {0: set(range(30)), 1: set(range(10, 40))})
    stray = tmp_path / "r" / "evaluate" / "shard-9.deadbeef.parquet"   # an attempt that never committed
    stray.write_bytes((next((tmp_path / "r" / "evaluate").glob("shard-0.*.parquet"))).read_bytes())
    doc = report.summarize_run(run)
    assert doc["samples"] == 40 and doc["worst_case"][0]["k"] == 20
    assert doc["cost"]["shards"] == 2 and doc["cost"]["shard_seconds_total"] == 3.0
    marker = json.loads((tmp_path / "r" / "evaluate" / "shard-1.done.json").read_text())
    (tmp_path / "r" / "evaluate" / marker["parquet"]).write_bytes(stray.read_bytes())
    with pytest.raises(CommitError, match="checksum"):
        report.summarize_run(run)


def test_shard_checks_from_markers_are_shown(tmp_path):
    bad = {"0": [{"name": "gradients", "passed": False, "detail": "all zero", "values": {}}]}
    run = _commit_run(tmp_path / "r", {0: set(range(20))}, checks=bad)
    doc = report.summarize_run(run)
    assert doc["checks"]["shard"]["0"][0]["failed_shards"] == 2
    assert "attack 0: gradients: shard-0: all zero" in report.format_table(doc)


def test_paired_comparison_mcnemar_and_bootstrap(tmp_path):
    a = _commit_run(tmp_path / "a", {0: set(range(20)), 1: set(range(40))})       # worst: k0..k19
    b = _commit_run(tmp_path / "b", {0: set(range(5, 33)), 1: set(range(40))}, purifier="adp")  # k5..k32
    doc = build.report([a, b])
    assert doc["kind"] == "comparison" and len(doc["runs"]) == 2
    (p,) = doc["comparison"]["pairs"]
    assert p["refused"] is None and p["n"] == 40
    assert (p["only_a_robust"], p["only_b_robust"]) == (5, 13)        # k0..k4 ; k20..k32
    assert p["difference"] == pytest.approx((28 - 20) / 40)
    assert p["mcnemar_exact_p"] == binomtest(5, 18, 0.5).pvalue
    lo, hi = p["difference_ci95"]
    assert lo < p["difference"] < hi
    text = report.render([a, b], "text")
    assert "Paired comparison on the same samples" in text and "0 vs 1" in text


def test_paired_statistics_refused_over_different_samples(tmp_path):
    a = _commit_run(tmp_path / "a", {0: set(range(20))}, n=40)
    b = _commit_run(tmp_path / "b", {0: set(range(20))}, n=30, shards=3)
    (p,) = build.report([a, b])["comparison"]["pairs"]
    assert "different samples" in p["refused"] and p["shared"] == 30
    assert "paired statistics refused: the runs cover different samples" in report.render([a, b], "text")


def test_robustbench_export(tmp_path):
    run = _commit_run(tmp_path / "r", {0: set(range(30)), 1: set(range(10, 40))})
    files = robustbench.export(report.summarize_run(run), "cifar10")
    ((path, info),) = files.items()
    assert path.startswith("cifar10/Linf/")
    assert info["eps"] == "0.1"   # 0.1·255 = 25.5 is off the 1/255 grid
    assert info["clean_acc"] == "100.00" and info["external"] == "50.00"
    assert info["number_forward_passes"] == 2 * (1 + 1)      # R=2 runs of (1 purifier + 1 classifier)
    assert (info["R"], info["EOT"], info["gradient_mode"], info["decision_rule"]) == (2, [1], ["bpda", "full"],
                                                                                      "mean_logit")
    assert info["n_examples"] == 40 and "autoattack_acc" not in info
    assert robustbench.eps_string(8 / 255, "linf") == "8/255" and robustbench.eps_string(0.5, "l2") == "0.5"


def test_cli_formats(tmp_path, capsys):
    run = _commit_run(tmp_path / "r", {0: set(range(30))})
    assert main(["report", run]) == 0
    assert "Headline: per-sample worst case" in capsys.readouterr().out
    assert main(["report", run, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 3 and doc["worst_case"][0]["acc"] == 0.75
    assert main(["report", run, "--format", "markdown", "-o", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text().startswith("## j (evaluate)")
    assert main(["report", run, "--format", "robustbench", "--dataset", "mnist", "-o", str(tmp_path / "rb")]) == 0
    assert len(list((tmp_path / "rb" / "mnist" / "Linf").glob("*.json"))) == 1


def test_report_path_does_not_import_torch(tmp_path):
    run = _commit_run(tmp_path / "r", {0: set(range(30)), 1: set(range(5))})
    code = ("import sys\nfrom pipeline.cli import main\n"
            "for fmt in ('text', 'markdown', 'json', 'robustbench'):\n"
            f"    main(['report', {run!r}, {run!r}, '--format', fmt])\n"
            "assert 'torch' not in sys.modules, 'the report imported torch'\n"
            "assert 'matplotlib' not in sys.modules, 'a text report imported matplotlib'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
