"""The names config, evaluation and the report agree on, in one torch-free module (the
report imports it where only pyarrow is installed).

Gradient modes say how an attack's gradient crosses the purifier; decisions say how the R
purification runs of a sample decide one prediction (the rules themselves are in
`pipeline.evaluation.decision`).
"""
from __future__ import annotations

# "full": autograd through the purifier; "bpda": straight-through (identity backward);
# "classifier": the bare classifier, purifier-blind (a transfer attack)
GRADIENT_MODES = ("full", "bpda", "classifier")
ADAPTIVE_GRADIENT_MODES = ("full", "bpda")        # the modes whose gradient sees the purifier
GRADIENT_REQUESTS = ("auto", *GRADIENT_MODES)     # attacks[i].gradient: auto = from the purifier's flags

# a job's decision rule → the record column holding its prediction
DECISION_COLUMNS = {"mean_logit": "mean_logit_pred", "vote": "vote_pred", "mean_softmax": "mean_softmax_pred"}
DECISIONS = tuple(DECISION_COLUMNS)
DEFAULT_DECISION = "mean_logit"                   # also the rule of records older than their decision column
# evaluation.verdict: R-run evaluations decide (the default; records older than the column),
# or the attacks' confirmed breaks and a nominated, re-checked clean evaluation (Hill et al.)
VERDICTS = ("runs", "recheck")

# registered attacks that never read a gradient (their class says `uses_gradient = False`;
# tests/test_decision.py holds the registry to this list)
GRADIENT_FREE_ATTACKS = ("square",)
NO_ATTACK_NAME = "none"                           # attack_name of the rows without an attack
