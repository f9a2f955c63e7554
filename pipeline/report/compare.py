"""Two or more runs on the same samples: each run's headline, and per pair of runs the
paired difference of the worst-case robust accuracy at each shared (ε, norm), with
McNemar's exact test (a binomial test on the discordant samples) and a paired bootstrap
95 % interval. Runs over different samples are refused for paired statistics."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.stats import binomtest

BOOTSTRAP_DRAWS = 10_000
BOOTSTRAP_SEED = 0   # fixed: the same records give the same interval


def _at(samples: pa.Table, eps: float, norm: str | None, entries: int) -> pa.Table:
    """The complete samples (a row for every attack entry) at one (ε, norm)."""
    norm_mask = pc.is_null(samples["norm"]) if norm is None else pc.equal(samples["norm"], norm)
    mask = pc.and_(pc.and_(pc.equal(samples["eps"], eps), norm_mask), pc.equal(samples["entries"], entries))
    return samples.filter(mask).select(["key", "label", "robust"])


def _refusal(a: pa.Table, b: pa.Table, joined: pa.Table) -> str | None:
    """Why paired statistics do not apply, or None."""
    for name, t in (("first", a), ("second", b)):
        if pc.count_distinct(t["key"]).as_py() != t.num_rows:
            return f"the {name} run has the same sample key more than once: samples cannot be paired"
    if joined.num_rows != a.num_rows or joined.num_rows != b.num_rows:
        return (f"the runs cover different samples ({a.num_rows} and {b.num_rows} samples, "
                f"{joined.num_rows} keys shared): paired statistics need the same samples in both")
    if not pc.all(pc.equal(joined["label_a"], joined["label_b"])).as_py():
        return "the same keys carry different labels: these are not the same samples"
    return None


def paired(a: pa.Table, b: pa.Table) -> dict[str, Any]:
    """Paired worst-case comparison of two runs' samples (key, label, robust) at one ε."""
    joined = a.join(b, keys="key", join_type="inner", left_suffix="_a", right_suffix="_b")
    refused = _refusal(a, b, joined)
    if refused:
        return {"refused": refused, "n_a": a.num_rows, "n_b": b.num_rows, "shared": joined.num_rows}
    if not joined.num_rows:
        return {"refused": "no complete samples to pair at this ε", "n_a": 0, "n_b": 0, "shared": 0}
    ra, rb = joined["robust_a"], joined["robust_b"]
    only_a = pc.sum(pc.and_(ra, pc.invert(rb))).as_py() or 0
    only_b = pc.sum(pc.and_(pc.invert(ra), rb)).as_py() or 0
    n = joined.num_rows
    k_a, k_b = pc.sum(ra).as_py() or 0, pc.sum(rb).as_py() or 0
    discordant = only_a + only_b
    p = binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    # paired bootstrap: resampling samples with replacement = multinomial over (a only, b only, same)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = rng.multinomial(n, [only_a / n, only_b / n, 1 - discordant / n], size=BOOTSTRAP_DRAWS)
    lo, hi = np.quantile((draws[:, 1] - draws[:, 0]) / n, [0.025, 0.975])
    return {"refused": None, "n": n, "acc_a": k_a / n, "acc_b": k_b / n, "difference": (k_b - k_a) / n,
            "only_a_robust": only_a, "only_b_robust": only_b, "mcnemar_exact_p": float(p),
            "difference_ci95": [float(lo), float(hi)], "ci_method": f"paired bootstrap ({BOOTSTRAP_DRAWS} draws)"}


def headline(doc: dict[str, Any]) -> dict[str, Any]:
    clean = (doc.get("clean") or {}).get("defended")
    return {"run": doc.get("run"), "job": doc.get("job"), "purifier": doc.get("purifier"),
            "classifier": doc.get("classifier"), "samples": doc.get("samples"),
            "clean_defended": clean,
            "worst_case": [{k: w[k] for k in ("eps", "eps_255", "norm", "n", "acc", "lo", "hi")}
                           for w in doc["worst_case"]]}


def compare(docs: list[dict[str, Any]], samples: list[pa.Table]) -> dict[str, Any]:
    """Headlines of every run and the paired statistics of every pair, at each (ε, norm)
    both runs have. Difference = second − first."""
    pairs = []
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            wa = {(w["eps"], w["norm"]): w for w in docs[i]["worst_case"]}
            wb = {(w["eps"], w["norm"]): w for w in docs[j]["worst_case"]}
            for eps, norm in sorted(set(wa) & set(wb), key=lambda k: (k[1] or "", k[0])):
                stats = paired(_at(samples[i], eps, norm, wa[(eps, norm)]["entries"]),
                               _at(samples[j], eps, norm, wb[(eps, norm)]["entries"]))
                pairs.append({"a": i, "b": j, "run_a": docs[i].get("run"), "run_b": docs[j].get("run"),
                              "eps": eps, "eps_255": eps * 255, "norm": norm, **stats})
            if not set(wa) & set(wb):
                pairs.append({"a": i, "b": j, "run_a": docs[i].get("run"), "run_b": docs[j].get("run"),
                              "eps": None, "norm": None,
                              "refused": "the runs share no (ε, norm) with a worst case: nothing to pair"})
    return {"runs": [headline(d) for d in docs], "pairs": pairs}
