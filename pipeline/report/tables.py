"""The report's tables, built once from the report document and rendered as plain text,
Markdown or HTML (the HTML page adds figures around the same tables)."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

MAX_CLASS_ROWS = 20   # above this many classes the text shows the worst ones (JSON has all)
FLAGGED = "CHECKS FLAGGED (the numbers above may overstate robustness):"


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def pct(d: dict[str, Any] | None, interval: bool = True) -> str:
    if d is None or d.get("acc") is None:
        return "n/a"
    if not interval or d.get("lo") is None:
        return f"{100 * d['acc']:.1f}"
    return f"{100 * d['acc']:.1f} [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}]"


def _num(v: float | None, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


def eps_text(eps: float | None, norm: str | None) -> str:
    """ε as written and on the /255 scale (ℓ∞): "0.1 (25.5/255)", "8/255 (0.03137)"."""
    if eps is None:
        return "-"
    if (norm or "linf") != "linf":
        return f"{eps:.4g}"
    k = eps * 255
    on_grid = k > 0 and abs(k - round(k)) < 1e-6
    scaled = f"{round(k)}/255" if on_grid else f"{k:.1f}/255"
    if on_grid and float(f"{eps:.4g}") != eps:   # 8/255 = 0.0313725…: written as a fraction
        return f"{scaled} ({eps:.4g})"
    return f"{eps:.4g} ({scaled})"


_eps = eps_text


def worst_label(attacks: list[int]) -> str:
    if len(attacks) == 1:   # no worst case to take: say so rather than "worst case of attacks 0"
        return f"attack {attacks[0]} (the only one at this ε)"
    return f"worst case of attacks {', '.join(map(str, attacks))}"


def headline(doc: dict[str, Any]) -> str:
    text = (f"job {doc['job']}  stage {doc['stage']}  purifier {doc['purifier']}  classifier {doc['classifier']}  "
            f"samples {doc['samples']}  rows {doc['rows']}  failed {doc['failed_rows']}  "
            f"decision {doc['decision']}  config {doc['config_hash']}")
    found = doc.get("stages_with_records") or []
    if len(found) > 1:   # which of the job's stages the figures below are from
        others = " or ".join(f"--stage {s}" for s in found if s != doc["stage"])
        other = "the others" if len(found) > 2 else "the other"
        text += f"\nstages with records: {', '.join(found)}; this report shows {doc['stage']} ({others} for {other})"
    quarantined = (doc.get("provenance") or {}).get("quarantined_shards")
    if quarantined:   # their samples are in no figure: say so next to the sample count
        text += f"\nQUARANTINED shards, not in any figure: {', '.join(quarantined)}"
    return text


def worst_section(doc: dict[str, Any]) -> Section:
    clean = (doc.get("clean") or {}).get("defended")
    rows = [[worst_label(w["attacks"]),
             w["norm"] or "-", _eps(w["eps"], w["norm"]), str(w["n"]), pct(clean), pct(w),
             str(w["incomplete"])] for w in doc["worst_case"]]
    return Section("Headline: per-sample worst case over every attack at each ε",
                   ["", "norm", "ε", "n", "clean (defended)", "robust (worst case)", "incomplete"], rows,
                   ["a sample counts as robust only if it survived every attack entry at that ε "
                    f"(decision rule: {doc['decision']}); 'incomplete' samples lack a row and are not in n",
                    *filter(None, [gate_note(doc)])])


def attack_section(doc: dict[str, Any]) -> Section:
    rows = [[str(a["attack_index"]), a["attack"], a["gradient"] or "-", _eps(a["eps"], a["norm"]), str(a["eot"]),
             str(a["runs"]), str(a["n"]), pct(a["clean_classifier"]), pct(a["clean_defended"]),
             pct(a["adv_classifier"]), pct(a["robust"]), pct(a["robust_mean_logit"], False),
             pct(a["robust_vote"], False), pct(a["robust_worst_of_runs"], False)] for a in doc["attacks"]]
    return Section("Per attack", ["#", "attack", "grad", "ε", "EOT", "R", "n", "clean (bare)", "clean (defended)",
                                  "adv (bare)", "robust (verified)", "mean logit", "vote", "worst-of-R"], rows,
                   ["accuracy % with Wilson 95% intervals; 'bare' = classifier alone, 'defended' = purifier + "
                    "classifier (clean: under the job's decision rule); " + _verdict_note(doc) + _skipped_note(doc)])


def _verdict_note(doc: dict[str, Any]) -> str:
    """What 'robust (verified)' and the rule columns mean under the job's evaluation.verdict."""
    if doc.get("verdict") == "recheck":
        return ("verdict recheck (Hill et al.'s record): 'robust (verified)' = no break confirmed at any step, "
                "the returned image's included — the attack's EOT forward nominates, re-check draws confirm — "
                "with no R-run evaluation, so mean logit / vote / worst-of-R are n/a; clean (defended) = the first "
                "attack's EOT draws, re-checked where they misclassify. Both read higher than R-run verdicts "
                "where a nomination misses")
    return ("'robust (verified)' = no confirmed break at any step and final re-evaluation correct; mean logit / "
            "vote / worst-of-R: the final iterate under each convention, a confirmed break (and a sample "
            "misclassified clean, when not attacked) counting as broken under every rule")


def _skipped_note(doc: dict[str, Any]) -> str:
    skipped = sum(a.get("final_skipped") or 0 for a in doc["attacks"])
    rows = f"{skipped} row{'s' if skipped != 1 else ''}"
    return (f" (the final R-run evaluation was not run for the {rows} whose break the attack confirmed: "
            "the verdict needs none)") if skipped else ""


def gate_note(doc: dict[str, Any]) -> str:
    """The clean gate's rows, as the report states them (empty when it kept none)."""
    gated = max((a.get("gated") or 0 for a in doc["attacks"]), default=0)   # each entry gates the same samples
    if not gated:
        return ""
    samples = f"{gated} sample{'s' if gated != 1 else ''}"
    return (f"{samples} the defended model misclassified clean were not attacked and count not robust "
            "(evaluation.attack_misclassified: false, as AutoAttack)")


def cost_section(doc: dict[str, Any]) -> Section:
    def norm(d: dict[str, Any] | None, k: str) -> str:
        return _num(d[k] if d else None, ".4f")

    rows = [[str(a["attack_index"]), a["attack"], _eps(a["eps"], a["norm"]), norm(a["linf"], "mean"),
             norm(a["linf"], "max"), norm(a["l2"], "mean"), norm(a["l2"], "max"), _num(a["attack_nfe_per_sample"]),
             _num(a["purify_nfe_per_sample"]), _num(a["number_forward_passes"]), _num(a["seconds_per_sample"])]
            for a in doc["attacks"]]
    c = doc["cost"]
    return Section("Perturbation norms and cost", ["#", "attack", "ε", "mean ℓ∞", "max ℓ∞", "mean ℓ2", "max ℓ2",
                                                    "attack evals/sample", "purifier evals/sample",
                                                    "forward passes/prediction", "s/sample"], rows,
                   [f"total compute {c['seconds_total']:.1f} s over {c['samples']} samples "
                    f"({_num(c['seconds_per_sample'])} s/sample, {_num(c['model_evaluations_per_sample'])} model "
                    "evaluations/sample)" + (f"; shard wall time {c['shard_seconds_total']:.1f} s in {c['shards']} "
                                             "shards" if c["shards"] else "")])


def class_section(doc: dict[str, Any]) -> Section:
    classes = doc["per_class"]
    keys = [(w["eps"], w["norm"]) for w in doc["worst_case"]]
    notes = []
    if len(classes) > MAX_CLASS_ROWS:
        first = lambda c: next((w["acc"] for w in c.get("worst_case", [])), 1.0)  # noqa: E731
        classes = sorted(classes, key=first)[:MAX_CLASS_ROWS]
        notes.append(f"the {MAX_CLASS_ROWS} classes with the lowest worst case of {len(doc['per_class'])}; "
                     "every class is in --format json")
    rows = []
    for c in classes:
        worst = {(w["eps"], w["norm"]): w for w in c.get("worst_case", [])}
        rows.append([str(c["label"]), str((c.get("clean_defended") or c.get("clean_classifier") or {}).get("n", "-")),
                     pct(c.get("clean_classifier"), False), pct(c.get("clean_defended"), False)]
                    + [pct(worst.get(k), False) for k in keys])
    return Section("Per class", ["label", "n", "clean (bare)", "clean (defended)"]
                   + [f"worst case {_eps(e, n)}" for e, n in keys], rows, notes)


def check_sample_line(doc: dict[str, Any]) -> str | None:
    """What the gradient-masking checks ran on (evaluation.check_samples spread over the
    shards); None for records whose markers do not say."""
    sample = (doc.get("checks") or {}).get("sample")
    if not sample:
        return None
    if not sample["samples"]:
        return "gradient-masking checks: none ran (evaluation.check_samples 0, or no attack)"
    of = f" (of {sample['of_shards']} committed)" if sample["of_shards"] != sample["shards"] else ""
    return (f"gradient-masking checks on {sample['samples']} sample{'s' * (sample['samples'] != 1)} over "
            f"{sample['shards']} shard{'s' * (sample['shards'] != 1)}{of}")


def checks_lines(doc: dict[str, Any]) -> list[str]:
    checks = doc.get("checks") or {}
    failed = [c for c in checks.get("record", []) if not c["passed"]]
    for idx, results in sorted((checks.get("shard") or {}).items()):
        failed += [{**c, "attack_index": int(idx)} for c in results if not c["passed"]]
    n = len(checks.get("record", [])) + sum(len(v) for v in (checks.get("shard") or {}).values())
    sample = [line for line in [check_sample_line(doc)] if line]
    if not n:
        return ["checks: none apply to these records"] + sample
    if not failed:
        return [f"checks: all {n} passed (record-level: ε sweep, attack ordering, Square vs gradient, "
                "convergence; shard-level: gradients, randomness, EOT)"] + sample
    lines = [FLAGGED]
    for c in failed:
        where = f"attack {c['attack_index']}: " if "attack_index" in c else ""
        lines.append(f"  - {where}{c['name']}: {c['detail']}")
    return lines + sample


def run_sections(doc: dict[str, Any]) -> list[Section]:
    out = [worst_section(doc)] if doc["worst_case"] else []
    out += [attack_section(doc), cost_section(doc)]
    if doc["per_class"]:
        out.append(class_section(doc))
    return out


def comparison_sections(comp: dict[str, Any]) -> list[Section]:
    keys = sorted({(w["eps"], w["norm"]) for r in comp["runs"] for w in r["worst_case"]},
                  key=lambda k: (k[1] or "", k[0]))
    rows = []
    for i, r in enumerate(comp["runs"]):
        worst = {(w["eps"], w["norm"]): w for w in r["worst_case"]}
        rows.append([str(i), str(r["run"]), str(r["job"]), str(r["purifier"]), str(r["samples"]),
                     pct(r["clean_defended"])] + [pct(worst.get(k)) for k in keys])
    runs = Section("Runs", ["", "run", "job", "purifier", "samples", "clean (defended)"]
                   + [f"worst case {_eps(e, n)}" for e, n in keys], rows)
    prow, notes = [], []
    for p in comp["pairs"]:
        if p["refused"]:
            notes.append(f"runs {p['a']} and {p['b']} at ε {_eps(p['eps'], p['norm'])}: paired statistics "
                         f"refused: {p['refused']}")
            continue
        lo, hi = p["difference_ci95"]
        prow.append([f"{p['a']} vs {p['b']}", _eps(p["eps"], p["norm"]), str(p["n"]), f"{100 * p['acc_a']:.1f}",
                     f"{100 * p['acc_b']:.1f}", f"{100 * p['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
                     str(p["only_a_robust"]), str(p["only_b_robust"]), f"{p['mcnemar_exact_p']:.3g}"])
    pairs = Section("Paired comparison on the same samples (worst case)",
                    ["pair", "ε", "n", "a %", "b %", "b − a (95% CI)", "only a robust", "only b robust",
                     "McNemar exact p"], prow,
                    ["difference = second run − first; interval: paired bootstrap; p: exact binomial test on "
                     "the discordant samples (McNemar)"] + notes)
    return [runs, pairs]


def _cells(rows: list[list[str]]) -> list[list[str]]:
    return [[c.replace("|", "/") for c in r] for r in rows]


def render_text(sections: list[Section]) -> str:
    lines: list[str] = []
    for s in sections:
        table = [s.header] + s.rows
        widths = [max(len(r[i]) for r in table) for i in range(len(s.header))]
        lines += ["", s.title, " | ".join(h.ljust(w) for h, w in zip(s.header, widths)).rstrip()]
        lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in s.rows]
        lines += s.notes
    return "\n".join(lines)


def render_markdown(sections: list[Section]) -> str:
    lines: list[str] = []
    for s in sections:
        lines += ["", f"### {s.title}", "", "| " + " | ".join(s.header) + " |",
                  "|" + "|".join("---" for _ in s.header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in _cells(s.rows)]
        lines += [""] + [f"_{n}_" for n in s.notes] if s.notes else []
    return "\n".join(lines)


def render_html(sections: list[Section]) -> str:
    parts = []
    for s in sections:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in s.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in s.rows)
        notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in s.notes)
        parts.append(f"<h3>{html.escape(s.title)}</h3><table><thead><tr>{head}</tr></thead>"
                     f"<tbody>{body}</tbody></table>{notes}")
    return "\n".join(parts)


def format_text(doc: dict[str, Any]) -> str:
    """A run's report (or a comparison of runs) as plain text."""
    if doc.get("kind") == "comparison":
        runs = "\n\n".join(format_text(d) for d in doc["runs"])
        return runs + "\n" + render_text(comparison_sections(doc["comparison"]))
    return "\n".join([headline(doc), render_text(run_sections(doc)), ""] + checks_lines(doc))


def format_markdown(doc: dict[str, Any]) -> str:
    """A run's report (or a comparison) as Markdown, to paste into a paper draft or an issue."""
    if doc.get("kind") == "comparison":
        runs = "\n\n".join(format_markdown(d) for d in doc["runs"])
        return runs + "\n\n## Comparison\n" + render_markdown(comparison_sections(doc["comparison"]))
    checks = checks_lines(doc)
    return "\n".join([f"## {doc['job']} ({doc['stage']})", "", headline(doc).replace("\n", "  \n"),
                      render_markdown(run_sections(doc)), "", "### Checks", ""]
                     + [checks[0]] + [c.strip() for c in checks[1:]])
