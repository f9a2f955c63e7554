"""One self-contained HTML page (figures and images embedded as base64 PNG): the headline
and tables of the text report, matplotlib figures (robust accuracy against ε, attack step,
EOT draws and runs R; per class), example images, checks and provenance.

Needs matplotlib (`pip install advpure[report]`); the text, Markdown and JSON reports do not.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable

from pipeline.report import images, tables

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#f4f4f4}.note{color:#555;font-size:85%;margin:.2em 0}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:85%;color:#444;max-width:480px}
.flag{color:#a00}.ok{color:#060}.grid img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #999}
.grid td{text-align:center;font-size:80%}pre{background:#f8f8f8;padding:.5em;overflow:auto;font-size:13px}"""


def _plt():
    import matplotlib

    matplotlib.use("Agg")   # no display: render to memory
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _x_eps(eps: float, norm: str | None) -> float:
    return eps * 255 if (norm or "linf") == "linf" else eps


def _errorbar(ax, xs: list, pts: list[dict[str, Any]], **kw) -> None:
    ys = [100 * p["acc"] for p in pts]
    err = [[100 * (p["acc"] - p["lo"]) for p in pts], [100 * (p["hi"] - p["acc"]) for p in pts]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, **kw)


def fig_eps(doc: dict[str, Any]) -> str | None:
    c = doc["curves"]
    if not c["eps"] and not c["worst_case_eps"]:
        return None
    single = {(p["eps"], s["norm"]) for s in c["eps"] + c["worst_case_eps"] for p in s["points"]}
    if len(single) == 1:   # one ε: a line has nowhere to go; one bar per attack and the worst case
        return _fig_eps_bars(c, *single.pop())
    fig, ax = _plt().subplots(figsize=(6, 4))
    for w in c["worst_case_eps"]:   # underneath, dashed: the per-attack points stay visible on it
        xs = [_x_eps(p["eps"], w["norm"]) for p in w["points"]]
        _errorbar(ax, xs, w["points"], label=f"worst case ({w['norm']})", color="black", linewidth=3,
                  linestyle="--", alpha=.45, zorder=1)
    for s in c["eps"]:
        xs = [_x_eps(p["eps"], s["norm"]) for p in s["points"]]
        _errorbar(ax, xs, s["points"], label=_attack_label(s), alpha=.9, zorder=3)
    ax.set(xlabel="ε ×255 (ℓ∞) or ε (ℓ2)", ylabel="robust accuracy %", ylim=(-2, 102), title="Robust accuracy vs ε")
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _attack_label(s: dict[str, Any]) -> str:
    indices = s.get("attack_indices") or ([s["attack_index"]] if s.get("attack_index") is not None else [])
    index = "".join(f"#{i} " for i in indices)   # tells apart entries of the same attack and gradient
    return f"{index}{s['attack']} ({s['gradient']}, EOT {s['eot']})"


def _fig_eps_bars(c: dict[str, Any], eps: float, norm: str | None) -> str:
    bars = [(_attack_label(s), s["points"][0]) for s in c["eps"]]
    bars += [(f"worst case ({w['norm']})", w["points"][0]) for w in c["worst_case_eps"]]
    fig, ax = _plt().subplots(figsize=(max(6, .9 * len(bars)), 4))
    xs = list(range(len(bars)))
    pts = [p for _, p in bars]
    err = [[100 * (p["acc"] - p["lo"]) for p in pts], [100 * (p["hi"] - p["acc"]) for p in pts]]
    ax.bar(xs, [100 * p["acc"] for p in pts], yerr=err, capsize=3,
           color=["C0"] * (len(bars) - len(c["worst_case_eps"])) + ["black"] * len(c["worst_case_eps"]))
    ax.set(xticks=xs, ylabel="robust accuracy %", ylim=(0, 102),
           title=f"Robust accuracy at ε = {tables.eps_text(eps, norm)}")
    ax.set_xticklabels([label for label, _ in bars], rotation=30, ha="right", fontsize=7)
    ax.grid(alpha=.3, axis="y")
    return _png(fig)


def fig_steps(doc: dict[str, Any]) -> str | None:
    curves = [s for s in doc["curves"]["steps"] if s["no_break_by_step"]]
    if not curves:
        return None
    fig, ax = _plt().subplots(figsize=(6, 4))
    for s in curves:
        steps = list(range(1, len(s["no_break_by_step"]) + 1))
        eps = tables.eps_text(s["eps"], s.get("norm"))
        line, = ax.plot(steps, [100 * v for v in s["no_break_by_step"]],
                        label=f"#{s['attack_index']} {s['attack']} ({s['gradient']}) ε={eps}")
        if s["robust"] is not None:   # the verified figure: also needs the final re-evaluation right
            ax.plot([steps[-1]], [100 * s["robust"]], marker="*", markersize=10, color=line.get_color())
    lengths = [len(s["no_break_by_step"]) for s in curves]
    if max(lengths) >= 10 * min(lengths):   # Square's 1,000 queries beside 20 PGD steps
        ax.set_xscale("log")
    ax.set(xlabel="attack step", ylabel="% not yet broken", ylim=(-2, 102),
           title="Robust accuracy vs attack step (★ = final, verified)")
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    return _png(fig)


def fig_eot(doc: dict[str, Any]) -> str | None:
    if not doc["curves"]["eot"]:
        return None
    fig, ax = _plt().subplots(figsize=(6, 4))
    for s in doc["curves"]["eot"]:
        _errorbar(ax, [p["eot"] for p in s["points"]], s["points"],
                  label=f"{s['attack']} ({s['gradient']}) ε={tables.eps_text(s['eps'], s.get('norm'))}")
    ax.set(xscale="log", xlabel="EOT draws per step", ylabel="robust accuracy %", ylim=(-2, 102),
           title="Robust accuracy vs EOT draws")
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    return _png(fig)


def fig_runs(doc: dict[str, Any]) -> str | None:
    if not doc["curves"]["runs"]:
        return None
    fig, ax = _plt().subplots(figsize=(6, 4))
    for s in doc["curves"]["runs"]:
        rs = [p["r"] for p in s["points"]]
        line, = ax.plot(rs, [100 * p["vote_of_r"]["acc"] for p in s["points"]], marker="o",
                        label=f"#{s['attack_index']} {s['attack']}: vote of r")
        ax.plot(rs, [100 * p["worst_of_r"]["acc"] for p in s["points"]], marker="s", linestyle="--",
                color=line.get_color(), label=f"#{s['attack_index']} {s['attack']}: all r correct")
    ax.set(xlabel="purification runs r (of R)", ylabel="accuracy %", ylim=(-2, 102),
           title="Accuracy vs number of runs")
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    return _png(fig)


def fig_classes(doc: dict[str, Any]) -> str | None:
    classes = doc["per_class"]
    if not classes or len(classes) > 100:
        return None
    budgets = [(w["eps"], w["norm"]) for w in doc["worst_case"]]   # every ε, not the first only
    width = .8 / (1 + len(budgets))
    fig, ax = _plt().subplots(figsize=(max(6, len(classes) * (.2 + .15 * len(budgets))), 4))
    xs = list(range(len(classes)))
    clean = [100 * ((c.get("clean_defended") or {}).get("acc") or 0) for c in classes]
    ax.bar([x - .4 + width / 2 for x in xs], clean, width=width, label="clean (defended)")
    for i, (eps, norm) in enumerate(budgets, start=1):
        worst = [100 * next((w["acc"] for w in c.get("worst_case", []) if w["eps"] == eps and w["norm"] == norm), 0)
                 for c in classes]
        ax.bar([x - .4 + width * (i + .5) for x in xs], worst, width=width,
               label=f"worst case ε={tables.eps_text(eps, norm)}")
    ax.set(xticks=xs, xticklabels=[str(c["label"]) for c in classes], xlabel="class", ylabel="accuracy %",
           ylim=(0, 102), title="Per class")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))   # beside the bars, not on them
    return _png(fig)


FIGURES: list[tuple[str, Callable[[dict[str, Any]], str | None], str]] = [
    ("Robust accuracy vs ε", fig_eps, "the job has no attack entries with a robust verdict"),
    ("Robust accuracy vs attack step", fig_steps, "no per-step break records (broken_step)"),
    ("Robust accuracy vs EOT draws", fig_eot, "the job has no attack that differs only in EOT draws"),
    ("Accuracy vs number of purification runs", fig_runs, "the job evaluates a single run (R = 1)"),
    ("Per-class accuracy", fig_classes, "no per-class figures (none, or more than 100 classes)"),
]


def _figure(title: str, b64: str | None, missing: str) -> str:
    if b64 is None:
        return f"<p class='note'>{html.escape(title)}: not shown — {html.escape(missing)}.</p>"
    return (f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _examples(output: str, limit: int) -> str:
    found, note = images.examples(output, limit)
    if not found:
        return f"<p class='note'>{html.escape(note)}</p>"
    columns = list(dict.fromkeys(c for e in found for c in e["images"]))
    head = "<tr><th>sample</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    rows = []
    for e in found:
        cells = "".join(f"<td><img alt='{html.escape(c)}' src='data:image/png;base64,{e['images'][c]}'></td>"
                        if e["images"].get(c) else "<td>n/a</td>" for c in columns)
        verdict = {True: "robust", False: "broken", None: "—"}[e["c_robust"]]
        rows.append(f"<tr><td>{html.escape(str(e['key']))}<br>label {e['label']}<br>bare on adv: {e['adv_pred']}"
                    f"<br>defended: {_defended(e)}<br>{verdict}</td>{cells}</tr>")
    return f"<p class='note'>{html.escape(note)}</p><table class='grid'>{head}{''.join(rows)}</table>"


def _defended(e: dict[str, Any]) -> str:
    """The defended prediction on the adversarial image, or why there is none."""
    if e.get("gated"):
        return "not attacked (misclassified clean)"
    if e.get("final_skipped"):
        return "not evaluated (confirmed break)"
    if e.get("mean_logit_pred") is None:
        return "no R-run evaluation (evaluation.verdict: recheck)"
    return str(e["mean_logit_pred"])


def _checks(doc: dict[str, Any]) -> str:
    items = []
    for c in doc["checks"]["record"]:
        items.append((c, "record"))
    for idx, results in sorted(doc["checks"]["shard"].items()):
        items += [({**c, "attack_index": idx}, "shard") for c in results]
    sample = tables.check_sample_line(doc)
    note = f"<p class='note'>{html.escape(sample)}</p>" if sample else ""
    if not items:
        return "<p class='note'>no checks apply to these records</p>" + note
    rows = "".join(f"<tr><td class='{'ok' if c['passed'] else 'flag'}'>{'passed' if c['passed'] else 'FLAGGED'}"
                   f"</td><td>{kind}</td><td>{html.escape(str(c.get('attack_index', c.get('eps', ''))))}</td>"
                   f"<td>{html.escape(c['name'])}</td><td style='text-align:left'>{html.escape(c['detail'])}</td></tr>"
                   for c, kind in items)
    return ("<table><thead><tr><th>result</th><th>level</th><th>attack / ε</th><th>check</th><th>detail</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>{note}")


def _provenance(doc: dict[str, Any]) -> str:
    p = doc.get("provenance") or {}
    facts = {"config hash": doc["config_hash"], **{k: v for k, v in doc["models"].items()},
             "committed shards": p.get("committed_shards"),
             "quarantined shards": ", ".join(p.get("quarantined_shards") or []) or "none",
             "source shards": f"{len(p.get('sources') or [])} (e.g. {', '.join((p.get('sources') or [])[:2])})",
             "hosts / devices": f"{_versions(doc['cost']['hosts'])} / {_versions(doc['cost']['devices'])}",
             "worker versions": _versions(p.get("worker_versions")) or "not recorded by the workers",
             "report versions": _versions(p.get("report_versions")), "generated": p.get("generated")}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                   for k, v in facts.items())
    config = f"<pre>{html.escape(p['config_yaml'])}</pre>" if p.get("config_yaml") else ""
    return f"<table>{rows}</table>{config}"


def _versions(v: Any) -> str | None:
    """{"torch": "2.13.0", ...} as "torch 2.13.0, ...", not a Python dict; a list of such
    sets (workers that differed) separated by "; "."""
    if isinstance(v, list):   # a list of sets, or of names (hosts, devices)
        return ("; " if any(isinstance(x, dict) for x in v) else ", ").join(filter(None, map(_versions, v))) or None
    if isinstance(v, dict):
        return ", ".join(f"{k} {_versions(x)}" for k, x in v.items()) or None
    return None if v is None else str(v)


def run_body(doc: dict[str, Any], examples: int, heading: bool = True) -> str:
    """One run's sections; `heading`: its own h2 (a comparison page), else the run's path only
    (the page's h1 already names the job)."""
    figures = "".join(_figure(title, fn(doc), missing) for title, fn, missing in FIGURES)
    top = (f"<h2>{html.escape(str(doc['job']))} — {html.escape(str(doc['run']))}</h2>" if heading
           else f"<p class='note'>results: {html.escape(str(doc['run']))}</p>")
    return "\n".join([
        top,
        f"<p>{html.escape(tables.headline(doc))}</p>",
        tables.render_html(tables.run_sections(doc)[:1]), "<h3>Figures</h3>", figures,
        tables.render_html(tables.run_sections(doc)[1:]),
        "<h3>Examples</h3>", _examples(doc["run"], examples) if examples else "",
        "<h3>Checks</h3>", _checks(doc), "<h3>Configuration and provenance</h3>", _provenance(doc)])


def fig_compare(comp: dict[str, Any]) -> str | None:
    runs = comp["runs"]
    if not any(r["worst_case"] for r in runs):
        return None
    fig, ax = _plt().subplots(figsize=(6, 4))
    for i, r in enumerate(runs):
        pts = [w for w in r["worst_case"] if w["acc"] is not None]
        _errorbar(ax, [_x_eps(w["eps"], w["norm"]) for w in pts], pts, label=f"{i}: {r['job']} ({r['purifier']})")
    ax.set(xlabel="ε ×255 (ℓ∞) or ε (ℓ2)", ylabel="worst-case robust accuracy %", ylim=(-2, 102),
           title="Runs compared (worst case)")
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    return _png(fig)


def page(doc: dict[str, Any], examples: int = 8) -> str:
    """The whole report as one HTML document."""
    if doc.get("kind") == "comparison":
        title = "advpure report: " + " vs ".join(str(d["job"]) for d in doc["runs"])
        comp = doc["comparison"]
        body = "\n".join(["<h2>Comparison</h2>", _figure("Runs compared", fig_compare(comp), "no worst case"),
                          tables.render_html(tables.comparison_sections(comp))]
                         + [run_body(d, examples) for d in doc["runs"]])
    else:
        title = f"advpure report: {doc['job']}"
        body = run_body(doc, examples, heading=False)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
