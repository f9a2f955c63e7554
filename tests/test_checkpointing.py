"""Gradient checkpointing through K purification steps (pipeline.purifiers.steps).

Memory is measured in-process as the bytes autograd keeps saved for backward (per-row
tensors, counted live through saved_tensors_hooks: added when packed, removed when the
graph frees them), and compute as the number of network evaluations — both exact, so the
assertions do not depend on how loaded the machine is.
"""
from __future__ import annotations

import torch

from pipeline.purifiers import steps
from pipeline.purifiers.adp import ADPPurifier, ADPSettings
from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
from pipeline.purifiers.nets.ebm_nets import EBM
from pipeline.purifiers.nets.score_nets import SmallScoreNet
from pipeline.seeding import Noise

ROWS = 3  # no layer of the test networks has 3 output channels: weights are never counted


class LiveSavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Peak bytes of per-row tensors held by autograd graphs while the context is open."""

    def __init__(self, rows: int = ROWS):
        self.live = self.peak = 0
        counter = self

        class Box:
            def __init__(self, t: torch.Tensor, n: int):
                self.t, self.n = t, n

            def __del__(self):
                counter.live -= self.n

        def pack(t: torch.Tensor) -> Box:
            n = t.numel() * t.element_size() if t.dim() and t.shape[0] == rows else 0
            counter.live += n
            counter.peak = max(counter.peak, counter.live)
            return Box(t, n)

        super().__init__(pack, lambda box: box.t)


class Counted(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def _frozen(net: torch.nn.Module) -> torch.nn.Module:
    for q in net.parameters():
        q.requires_grad_(False)
    return net.eval()


def _keys(n: int = ROWS) -> Noise:
    return Noise.for_batch(0, [f"k{i}" for i in range(n)], "ckpt")


def _ebm() -> torch.nn.Module:
    torch.manual_seed(0)
    return _frozen(EBM(n_c=1, n_f=4, image_size=8))


def _grad_memory(purifier, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    meter = LiveSavedBytes()
    with meter:
        y = purifier(x, _keys())
        (g,) = torch.autograd.grad((y ** 2).sum(), x)
    assert meter.live == 0  # every graph freed
    return meter.peak, g


def _single_thread(fn):
    def wrapped(*a, **kw):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*a, **kw)
        finally:
            torch.set_num_threads(old)
    wrapped.__name__ = fn.__name__
    return wrapped


@_single_thread
def test_ebm_activation_memory_does_not_grow_with_k():
    """Fixed segments: what autograd holds is one segment's graph plus one chain state per
    segment — nothing else grows with K. Auto segments grow no faster than √K. Without
    checkpointing it grows ∝ K (the meter sees the difference)."""
    net, x = _ebm(), torch.rand(ROWS, 1, 8, 8)
    state = x.numel() * x.element_size()
    fixed, auto, plain = {}, {}, {}
    for k in (10, 100, 200):
        def chain(segment: int, k: int = k) -> LangevinEBMPurifier:
            return LangevinEBMPurifier(net, LangevinEBMSettings(steps=k, checkpoint_segment=segment))

        fixed[k], g_fixed = _grad_memory(chain(10), x)
        auto[k], g_auto = _grad_memory(chain(-1), x)
        plain[k], g_plain = _grad_memory(chain(0), x)
        torch.testing.assert_close(g_fixed, g_plain, rtol=0, atol=0)
        torch.testing.assert_close(g_auto, g_plain, rtol=0, atol=0)
    for k in (100, 200):
        activations = fixed[k] - (k // 10) * state   # minus one saved state per segment
        assert activations <= 1.5 * fixed[10], (k, fixed)
        assert auto[k] <= 1.5 * (k / 10) ** 0.5 * auto[10], (k, auto)
    assert plain[200] >= 15 * plain[10]
    assert auto[200] < plain[200] / 4


@_single_thread
def test_ebm_each_step_is_evaluated_once_forward_and_once_backward():
    """The regression this module exists for: torch's non-reentrant checkpoint re-ran a
    segment's prefix at every inner autograd.grad (s(s+1)/2 evaluations per segment). Now
    each step runs once forward and once more in backward — except the last segment's,
    which keeps its graph."""
    counted = Counted(_ebm())
    for segment, recomputed in ((4, 12), (5, 15), (16, 0), (-1, None)):
        p = LangevinEBMPurifier(counted, LangevinEBMSettings(steps=16, checkpoint_segment=segment))
        x = torch.rand(ROWS, 1, 8, 8, requires_grad=True)
        counted.calls = 0
        y = p(x, _keys())
        forward = counted.calls
        torch.autograd.grad(y.sum(), x)
        assert forward == 16 + (segment < 0), (segment, forward)  # auto measures one step's graph first
        if recomputed is None:
            assert 0 <= counted.calls - forward < 16
        else:
            assert counted.calls - forward == recomputed, (segment, counted.calls - forward)


@_single_thread
def test_adp_activation_memory_does_not_grow_with_k():
    torch.manual_seed(0)
    net = Counted(_frozen(SmallScoreNet(in_channels=1, width=4)))
    x = torch.rand(ROWS, 1, 8, 8)
    state = x.numel() * x.element_size() + ROWS  # score-grid state + bool mask per segment
    fixed, plain = {}, {}
    for k in (10, 50, 150):
        p = ADPPurifier(net, ADPSettings(max_iter=k, stop_alpha=0.0, checkpoint_segment=5))
        net.calls = 0
        fixed[k], g = _grad_memory(p, x)
        assert net.calls == 4 * k  # 2 evaluations per iteration, forward and backward (ADP recomputes all)
        plain[k], g0 = _grad_memory(ADPPurifier(net, ADPSettings(max_iter=k, stop_alpha=0.0, checkpoint_segment=0)), x)
        torch.testing.assert_close(g, g0, rtol=0, atol=0)
    for k in (50, 150):
        assert fixed[k] - (k // 5) * state <= 1.5 * fixed[10], fixed
    assert plain[150] >= 10 * plain[10]
    m_auto, g_auto = _grad_memory(ADPPurifier(net, ADPSettings(max_iter=150, stop_alpha=0.0, checkpoint_segment=-1)), x)
    torch.testing.assert_close(g_auto, g0)
    assert m_auto < plain[150] / 3


def test_checkpoint_segment_matches_autograd_with_tuple_and_integer_outputs():
    w = torch.randn(4, 4, dtype=torch.float64)

    def fn(a: torch.Tensor, mask: torch.Tensor, b: torch.Tensor):
        h = torch.tanh(a @ w) * b
        g = steps.energy_grad(lambda z: (torch.tanh(z @ w) * b).pow(2).sum(1), a)  # inner autograd.grad
        return h + g, mask & (h.sum(1) > 0), h.detach()

    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, dtype=torch.bool)
    ref = fn(a, mask, b)
    got = steps.checkpoint_segment(fn, a, mask, b)
    assert not got[1].requires_grad and got[1].dtype == torch.bool
    torch.testing.assert_close(got[0], ref[0])
    assert torch.equal(got[1], ref[1])
    ga = torch.autograd.grad(ref[0].sum(), (a, b))
    gb = torch.autograd.grad(got[0].sum(), (a, b))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_auto_segment_is_memory_optimal():
    assert steps.auto_segment(100) == 10                 # sizes unknown: √K
    assert steps.auto_segment(1000, 1, 100) == 3         # √(1000/100)
    assert steps.auto_segment(10, 1, 1000) == 1          # never below one step
    assert steps.auto_segment(10, 1000, 1) == 10         # never above K


def test_measuring_a_step_graph_keeps_nothing_alive():
    """step_graph_bytes' graph is freed once measured, saved outputs included (tanh saves its
    result); packing a saved output as-is made a cycle that leaked every measured graph."""
    import weakref

    outs: list[weakref.ref] = []

    def step(x: torch.Tensor, t: int) -> torch.Tensor:
        y = torch.tanh(2.0 * x)
        outs.append(weakref.ref(y))
        return y

    assert steps.step_graph_bytes(step, torch.randn(3, 4), 0) > 0
    assert outs and outs[0]() is None


def test_checkpointed_chain_under_bf16_autocast_matches_its_recomputation():
    """The recomputation in backward runs under the forward's autocast state: the
    gradient equals the one of the same chain run without checkpointing."""
    net = _ebm()
    x = torch.rand(ROWS, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, g0 = _grad_memory(LangevinEBMPurifier(net, LangevinEBMSettings(steps=6, checkpoint_segment=0)), x)
        _, g1 = _grad_memory(LangevinEBMPurifier(net, LangevinEBMSettings(steps=6, checkpoint_segment=2)), x)
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(g1, g0)
