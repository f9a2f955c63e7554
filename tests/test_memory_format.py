"""evaluation.channels_last: auto — the networks' memory format chosen by measurement
(pipeline/evaluation/memory_format.py): the decision, the boundary hooks that keep every
tensor outside the networks contiguous, first and second order, and the record."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import config
from pipeline.evaluation import memory_format, row_chunks
from pipeline.evaluation.batch import defended
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from pipeline.run.worker import ShardWorker
from tests.conftest import job_dict


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    return net.eval().requires_grad_(False)


def _is_channels_last(net: nn.Module) -> bool:
    """Every 4-D weight with more than one input channel (one channel has one layout) is channels-last."""
    return all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1)


class _ViewsItsWeight(nn.Module):
    """A network that cannot run channels-last: it views its 4-D weight as a matrix."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv.weight.view(3, -1).sum() * 0


def _fake_seconds(per_call: dict[tuple[int, bool], float], seen: list) -> object:
    """memory_format._seconds without a clock: per_call[(id(net), channels-last?)] a call."""
    def seconds(net, call, args, kwargs, reps, sync):
        seen.append((id(net), _is_channels_last(net), call.grad, args[call.image].shape[0]))
        return per_call[(id(net), _is_channels_last(net))] * reps
    return seconds


def _prefer_channels_last(monkeypatch) -> None:
    """Timings (no clock) in which every network runs 10× faster channels-last, so the switch
    is exercised on every machine."""
    monkeypatch.setattr(memory_format, "_seconds",
                        lambda net, call, args, kwargs, reps, sync: reps * (1e-4 if _is_channels_last(net) else 1e-3))


def test_each_network_goes_channels_last_only_where_it_wins_every_run(monkeypatch):
    wins, close, idle = _net(), _net(), _net()
    x = torch.rand(4, 3, 8, 8)
    seen: list = []
    monkeypatch.setattr(memory_format, "_seconds", _fake_seconds(
        {(id(wins), False): 1e-3, (id(wins), True): 0.8e-3, (id(close), False): 1e-3, (id(close), True): 0.95e-3},
        seen))
    choice, switch = memory_format.choose([wins, close, idle], lambda: close(wins(x)), rows=16)
    assert choice.how == "timed" and choice.channels_last and switch is not None
    assert _is_channels_last(wins) and not _is_channels_last(close) and not _is_channels_last(idle)
    by_name = [(n["channels_last"], n["how"]) for n in choice.networks]
    assert by_name == [(True, "timed"), (False, "timed"), (False, "not called")]
    # per timed network: a warm-up, then the formats in turn; at the chunk's rows; forward only (no grad in the probe)
    for net in (wins, close):
        mine = [(cl, grad, rows) for i, cl, grad, rows in seen if i == id(net)]
        assert [cl for cl, _, _ in mine] == [False] + [False, True] * 3
        assert all(rows == 16 and not grad for _, grad, rows in mine)
    assert len(choice.networks[0]["contiguous_s"]) == len(choice.networks[0]["channels_last_s"]) == 2
    switch.undo()
    assert not _is_channels_last(wins) and not wins._forward_hooks and not wins._forward_pre_hooks


def test_a_network_that_fails_channels_last_stays_contiguous_and_the_others_are_timed():
    bad, good = _ViewsItsWeight(), _net()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    choice, _ = memory_format.choose([bad, good], lambda: torch.autograd.grad(good(bad(x)).sum(), x), rows=4)
    failed, timed = choice.networks
    assert failed["how"] == "failed" and "view" in failed["error"] and not _is_channels_last(bad)
    assert not bad._forward_hooks and timed["how"] == "timed"


def test_a_call_is_captured_with_its_gradient_mode_and_resized_to_the_chunk():
    net = _net()
    x, t = torch.rand(3, 3, 8, 8, requires_grad=True), torch.tensor([0.5, 0.5, 0.5])
    calls = memory_format.capture([net], lambda: (net(x), net(x[:1])))   # the first call is kept
    call = calls[id(net)]
    assert call.grad and call.rows == 3 and call.image == 0 and not call.args[0].requires_grad
    call.args.append(t)
    args, _ = memory_format._rows_of(call, 7)
    assert args[0].shape[0] == 7 and torch.equal(args[0][3:6], x.detach()) and args[1].shape == (7,)
    with torch.no_grad():
        assert not memory_format.capture([net], lambda: net(x))[id(net)].grad


def test_the_switch_keeps_outputs_and_gradients_contiguous_first_and_second_order():
    """Outside the networks every tensor stays in the default format, and values agree with
    the contiguous network to float32 rounding — forward, the input gradient, and the
    gradient of a gradient (a Langevin step under a full-gradient attack)."""
    net = _net()
    x = torch.rand(5, 3, 8, 8)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        (g,) = torch.autograd.grad((out ** 2).sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad((g * xi).sum(), xi)
        return out, g, gg
    plain = run()
    switch = memory_format.ChannelsLast([net])
    assert _is_channels_last(net)
    fast = run()
    for a, b in zip(plain, fast):
        assert b.is_contiguous() and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():   # an input that requires grad, under no_grad: no hook to place
        assert net(x.clone().requires_grad_(True)).is_contiguous()
    switch.undo()
    assert all(torch.equal(a, b) for a, b in zip(plain, run()))   # undone: the contiguous results again


def test_networks_are_the_classifier_and_the_purifier_networks(digits_models, tmp_path):
    job = job_dict("unused-*.tar", digits_models, str(tmp_path))
    p = build_protocol(config.from_dict(job))
    nets = memory_format.networks(row_chunks.defenses(p))
    assert nets[0] is p.defense.classifier and len(nets) == 2          # the CNN, the DAE
    assert all(any(q.dim() == 4 for q in n.parameters()) for n in nets)


def test_auto_is_settled_with_the_chunk_recorded_and_agrees_with_contiguous(digits_shards, digits_models, tmp_path,
                                                                            monkeypatch):
    """The worker settles the format with the chunk and every marker records it; the defended
    logits agree with the contiguous networks' to float32 rounding; ADVPURE_CHANNELS_LAST=false
    (the suite's setting) resolves auto to contiguous without timing."""
    monkeypatch.delenv(memory_format.ENV)
    samples = shards.read_shard(shards.expand(digits_shards["pattern"])[0])[:16]
    job = job_dict(digits_shards["pattern"], digits_models, str(tmp_path / "out"),
                   purifier={"name": "gaussian", "params": {"sigma": 0.3}}, evaluation={"runs": 4})
    assert config.from_dict(job).evaluation.channels_last == "auto"
    _prefer_channels_last(monkeypatch)
    w = ShardWorker(job)
    p = w.protocol
    x = torch.stack([torch.from_numpy(shards.to_unit_float(s.image)).permute(2, 0, 1) for s in samples])
    keys = [s.key for s in samples]
    plain, _, _ = defended(p.defense, x, keys, p.seed, "eval/clean", 4)
    row_chunks.settle(p, x, torch.tensor([s.label for s in samples]), keys)
    record = p.rows_choice.record()["channels_last"]
    assert record["channels_last"] is True and record["how"] == "timed"
    assert [n["network"] for n in record["networks"]] == ["SmallCNN"]   # the Gaussian purifier has no network
    assert _is_channels_last(p.defense.classifier)
    fast, _, _ = defended(p.defense, x, keys, p.seed, "eval/clean", 4)
    assert torch.allclose(plain, fast, rtol=1e-4, atol=1e-4)
    pinned = config.from_dict({**job, "evaluation": {"runs": 4, "channels_last": False}})
    q = build_protocol(pinned)
    row_chunks.settle(q, x, torch.tensor([s.label for s in samples]), keys)
    assert q.rows_choice.record()["channels_last"]["how"] == "configured"
    assert not _is_channels_last(q.defense.classifier)
    monkeypatch.setenv(memory_format.ENV, "false")
    q = build_protocol(config.from_dict(job))
    row_chunks.settle(q, x, torch.tensor([s.label for s in samples]), keys)
    assert q.rows_choice.record()["channels_last"]["how"] == "environment"
    assert not _is_channels_last(q.defense.classifier)


def test_corpus_purification_settles_the_format_too(digits_models, tmp_path, monkeypatch):
    """purify-corpus's engine settles the format after its chunk, records it, and its outputs
    agree with the contiguous network's to float32 rounding."""
    from pipeline.corpus import job
    from pipeline.corpus.engine import Engine

    monkeypatch.delenv(memory_format.ENV)
    _prefer_channels_last(monkeypatch)
    xs = [torch.rand(1, 8, 8) for _ in range(3)]

    def purified(channels_last: str) -> tuple[Engine, torch.Tensor]:
        cfg = job.build_config("unused.tar", str(tmp_path / channels_last), purifier="dae",
                               params={"checkpoint": digits_models["dae"]}, classifier=None, classifier_params=None,
                               corpus={}, overrides=[f"evaluation.channels_last={channels_last}"])
        engine = Engine(cfg)
        return engine, torch.stack([o.image for o in engine.run(xs, ["a", "b", "c"])])
    auto, fast = purified("auto")
    _, plain = purified("false")
    record = auto.rows_choice.record()["channels_last"]
    assert record["how"] == "timed" and [n["network"] for n in record["networks"]] == ["SmallDAE"]
    assert record["networks"][0]["channels_last"] and torch.allclose(fast, plain, atol=1e-5)


def test_a_wrong_value_names_the_key(digits_models, tmp_path):
    job = job_dict("unused-*.tar", digits_models, str(tmp_path), evaluation={"channels_last": "sometimes"})
    with pytest.raises(config.ConfigError, match="evaluation.channels_last"):
        config.from_dict(job)
