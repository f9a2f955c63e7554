"""What the text report and the HTML page say, on small committed runs and hand-made
figure inputs (no trained model): ε as written and /255, a single attack not called a worst
case, the configured step count, one title, versions as text, and figures that show what
they plot (bars for one ε, a log step axis for Square beside PGD, every ε per class with the
legend off the bars)."""
from __future__ import annotations

import pytest

from pipeline import report
from pipeline.report import images, record_checks, tables
from tests.test_report_runs import _commit_run


def test_eps_shown_as_written_and_on_the_255_scale():
    assert tables.eps_text(0.1, "linf") == "0.1 (25.5/255)"
    assert tables.eps_text(8 / 255, "linf") == "8/255 (0.03137)"
    assert tables.eps_text(0.2, "linf") == "0.2 (51/255)"
    assert tables.eps_text(0.5, "l2") == "0.5"


def test_one_attack_is_not_a_worst_case_of_attacks(tmp_path):
    text = report.render([_commit_run(tmp_path / "r", {0: set(range(20))})], "text")
    assert "worst case of attacks 0 " not in text and "attack 0 (the only one at this ε)" in text
    assert "0.1 (25.5/255)" in text
    two = report.render([_commit_run(tmp_path / "r2", {0: set(range(20)), 1: set(range(30))})], "text")
    assert "worst case of attacks 0, 1" in two


def test_convergence_names_the_configured_steps():
    attack = {"attack_index": 0, "attack": "pgd", "gradient": "full", "eot": 1, "eps": 0.1, "norm": "linf",
              "sweep_key": "{}", "robust": {"acc": 0.5}, "params": {"eps": 0.1, "steps": 10},
              "steps": 11, "late_breaks": 30, "own_n": 100}   # 11 iterates evaluated for 10 steps
    conv = [c for c in record_checks.run_record_checks([attack]) if c["name"] == "convergence"][0]
    assert not conv["passed"] and "of its 10 steps" in conv["detail"] and "11" not in conv["detail"]
    square = {**attack, "attack": "square", "params": {"eps": 0.1, "n_queries": 1000}, "steps": 1001}
    conv = [c for c in record_checks.run_record_checks([square]) if c["name"] == "convergence"][0]
    assert "of its 1000 queries" in conv["detail"]


# ---------------------------------------------------------------------------- HTML

pytest.importorskip("matplotlib")
from pipeline.report import html  # noqa: E402 - after the importorskip


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the page would embed, kept open to be inspected."""
    kept = []

    def keep(fig):
        fig.canvas.draw()
        kept.append(fig)
        return "png"

    monkeypatch.setattr(html, "_png", keep)
    yield kept
    for fig in kept:
        html._plt().close(fig)


def _pt(eps, acc):
    return {"eps": eps, "eps_255": eps * 255, "acc": acc, "lo": acc - .05, "hi": acc + .05, "n": 100}


def _curves(eps_list):
    attacks = [{"attack_index": i, "attack": name, "gradient": "full", "eot": 1, "norm": "linf",
                "points": [_pt(e, acc - e) for e in eps_list]} for i, (name, acc) in enumerate([("pgd", .6),
                                                                                                ("square", .7)])]
    worst = [{"norm": "linf", "points": [_pt(e, .55 - e) for e in eps_list]}]
    return {"curves": {"eps": attacks, "worst_case_eps": worst}}


def test_one_eps_is_drawn_as_bars(figures):
    html.fig_eps(_curves([0.2]))
    ax = figures[0].axes[0]
    assert len(ax.patches) == 3          # pgd, square, worst case: bars, not dots on a 49–53 axis
    assert "0.2 (51/255)" in ax.get_title()


def test_per_attack_points_are_drawn_over_the_worst_case(figures):
    doc = _curves([0.1, 0.2, 0.3])
    doc["curves"]["eps"][1].update(attack="pgd", attack_indices=[1, 3])
    html.fig_eps(doc)
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "#0 pgd (full, EOT 1)" in labels and "#1 #3 pgd (full, EOT 1)" in labels   # two pgd entries told apart
    worst = [c for c in ax.containers if c.get_label().startswith("worst case")][0]
    attacks = [c for c in ax.containers if not c.get_label().startswith("worst case")]
    assert all(worst.lines[0].get_zorder() < c.lines[0].get_zorder() for c in attacks)
    assert worst.lines[0].get_linestyle() == "--"


def test_step_axis_is_logarithmic_for_square_beside_pgd(figures):
    curve = {"attack_index": 0, "attack": "pgd", "gradient": "full", "eps": .1, "norm": "linf", "robust": .5}
    doc = {"curves": {"steps": [{**curve, "no_break_by_step": [.9] * 20},
                                {**curve, "attack_index": 1, "attack": "square", "no_break_by_step": [.9] * 1000}]}}
    html.fig_steps(doc)
    assert figures[0].axes[0].get_xscale() == "log"
    doc["curves"]["steps"][1]["no_break_by_step"] = [.9] * 30
    html.fig_steps(doc)
    assert figures[1].axes[0].get_xscale() == "linear"


def test_per_class_draws_every_eps_with_the_legend_beside_the_bars(figures):
    worst = [{"eps": e, "norm": "linf", "acc": .5} for e in (.1, .2, .3)]
    classes = [{"label": k, "clean_defended": {"acc": .9}, "worst_case": worst} for k in range(10)]
    html.fig_classes({"per_class": classes, "worst_case": worst})
    fig = figures[0]
    ax = fig.axes[0]
    assert len(ax.patches) == 10 * 4
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_page_title_once_versions_as_text_and_readable_yaml(tmp_path):
    run = _commit_run(tmp_path / "r", {0: set(range(20)), 1: set(range(30))})
    page = report.render([run], "html")
    assert page.count("<h1>") == 1 and "<h2>" not in page
    assert "font-size:80%}" not in page.split("pre{", 1)[1].split("}", 1)[0]
    assert "['" not in page.split("Configuration and provenance", 1)[1]   # no Python lists or dicts
    assert html._versions([{"torch": "2.13.0", "ray": "2.52.0"}]) == "torch 2.13.0, ray 2.52.0"
    assert html._versions(["vm", "gpu1"]) == "vm, gpu1"
    assert "{'" not in html._provenance({**report.summarize_run(run), "provenance": {
        "worker_versions": [{"torch": "2.13.0"}], "report_versions": {"python": "3.11"}}})


def test_examples_are_spread_over_shards(monkeypatch):
    markers = {f"shard-{i:06d}": {"source": f"s{i}"} for i in range(8)}
    monkeypatch.setattr(images.commit, "committed", lambda output, stage: markers)
    spread = images._spread("out", "purify", 8)
    assert [sid for sid, _, _ in spread] == ["shard-000000", "shard-000002", "shard-000004", "shard-000006"]
    assert sum(n for _, _, n in spread) == 8
    assert sum(n for _, _, n in images._spread("out", "purify", 3)) == 3
