"""One self-contained HTML page (figures and images embedded as base64 PNG): the headline
and tables of the text report, matplotlib figures (robust accuracy against ε, attack step,
EOT draws and runs R; per class), example images, checks and provenance.

Needs matplotlib (`pip install advpure[report]`); the text, Markdown and JSON reports do not.
"""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, Callable

from pipeline.report import images, tables

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#f4f4f4}.note{color:#555;font-size:85%;margin:.2em 0}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:85%;color:#444;max-width:480px}
.flag{color:#a00}.ok{color:#060}.grid img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #999}
.grid td{text-align:center;font-size:80%}pre{background:#f8f8f8;padding:.5em;overflow:auto;font-size:80%}"""


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
    fig, ax = _plt().subplots(figsize=(6, 4))
    for s in c["eps"]:
        xs = [_x_eps(p["eps"], s["norm"]) for p in s["points"]]
        _errorbar(ax, xs, s["points"], label=f"{s['attack']} ({s['gradient']}, EOT {s['eot']})", alpha=.8)
    for w in c["worst_case_eps"]:
        xs = [_x_eps(p["eps"], w["norm"]) for p in w["points"]]
        _errorbar(ax, xs, w["points"], label=f"worst case ({w['norm']})", color="black", linewidth=2.5)
    ax.set(xlabel="ε ×255 (ℓ∞) or ε (ℓ2)", ylabel="robust accuracy %", ylim=(-2, 102), title="Robust accuracy vs ε")
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    return _png(fig)


def fig_steps(doc: dict[str, Any]) -> str | None:
    curves = [s for s in doc["curves"]["steps"] if s["no_break_by_step"]]
    if not curves:
        return None
    fig, ax = _plt().subplots(figsize=(6, 4))
    for s in curves:
        steps = list(range(1, len(s["no_break_by_step"]) + 1))
        line, = ax.plot(steps, [100 * v for v in s["no_break_by_step"]],
                        label=f"#{s['attack_index']} {s['attack']} ({s['gradient']}) ε={s['eps'] * 255:.3g}/255")
        if s["robust"] is not None:   # the verified figure: also needs the final re-evaluation right
            ax.plot([steps[-1]], [100 * s["robust"]], marker="*", markersize=10, color=line.get_color())
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
                  label=f"{s['attack']} ({s['gradient']}) ε={s['eps'] * 255:.3g}/255")
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
    fig, ax = _plt().subplots(figsize=(max(6, len(classes) * .35), 4))
    xs = list(range(len(classes)))
    clean = [100 * ((c.get("clean_defended") or {}).get("acc") or 0) for c in classes]
    ax.bar([x - .2 for x in xs], clean, width=.4, label="clean (defended)")
    if doc["worst_case"]:
        w0 = doc["worst_case"][0]
        worst = [100 * next((w["acc"] for w in c.get("worst_case", []) if w["eps"] == w0["eps"]
                             and w["norm"] == w0["norm"]), 0) for c in classes]
        ax.bar([x + .2 for x in xs], worst, width=.4, label=f"worst case ε={w0['eps'] * 255:.3g}/255")
    ax.set(xticks=xs, xticklabels=[str(c["label"]) for c in classes], xlabel="class", ylabel="accuracy %",
           ylim=(0, 102), title="Per class")
    ax.legend(fontsize=7)
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
                    f"<br>defended: {e['mean_logit_pred']}<br>{verdict}</td>{cells}</tr>")
    return f"<p class='note'>{html.escape(note)}</p><table class='grid'>{head}{''.join(rows)}</table>"


def _checks(doc: dict[str, Any]) -> str:
    items = []
    for c in doc["checks"]["record"]:
        items.append((c, "record"))
    for idx, results in sorted(doc["checks"]["shard"].items()):
        items += [({**c, "attack_index": idx}, "shard") for c in results]
    if not items:
        return "<p class='note'>no checks apply to these records</p>"
    rows = "".join(f"<tr><td class='{'ok' if c['passed'] else 'flag'}'>{'passed' if c['passed'] else 'FLAGGED'}"
                   f"</td><td>{kind}</td><td>{html.escape(str(c.get('attack_index', c.get('eps', ''))))}</td>"
                   f"<td>{html.escape(c['name'])}</td><td style='text-align:left'>{html.escape(c['detail'])}</td></tr>"
                   for c, kind in items)
    return ("<table><thead><tr><th>result</th><th>level</th><th>attack / ε</th><th>check</th><th>detail</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


def _provenance(doc: dict[str, Any]) -> str:
    p = doc.get("provenance") or {}
    facts = {"config hash": doc["config_hash"], **{k: v for k, v in doc["models"].items()},
             "committed shards": p.get("committed_shards"), "quarantined shards": p.get("quarantined_shards"),
             "source shards": f"{len(p.get('sources') or [])} (e.g. {', '.join((p.get('sources') or [])[:2])})",
             "hosts / devices": f"{doc['cost']['hosts']} / {doc['cost']['devices']}",
             "worker versions": p.get("worker_versions") or "not recorded by the workers",
             "report versions": json.dumps(p.get("report_versions")), "generated": p.get("generated")}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                   for k, v in facts.items())
    config = f"<pre>{html.escape(p['config_yaml'])}</pre>" if p.get("config_yaml") else ""
    return f"<table>{rows}</table>{config}"


def run_body(doc: dict[str, Any], examples: int) -> str:
    figures = "".join(_figure(title, fn(doc), missing) for title, fn, missing in FIGURES)
    return "\n".join([
        f"<h2>{html.escape(str(doc['job']))} — {html.escape(str(doc['run']))}</h2>",
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
        body = run_body(doc, examples)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
