"""Nero: invariants, the turning angle, foreach == reference, state, dtypes, torch integration
(schedulers, GradScaler, state_dict/torch.load, closures, zero_grad), edge cases and bad input."""
from __future__ import annotations

import copy
import inspect
import io
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from nerofy import Nero, NeuronLayout
from nerofy.layout import ELEMENTWISE, ROWS
from nerofy.optim import nero_update

LR = 0.01
BETA = 0.999
GROUPED_T = NeuronLayout(axes=(1,), split_axis=0, groups=2)  # grouped ConvTranspose weight (in, out/g, k, k)
COLS = NeuronLayout(axes=(-1,))  # (in, out) weights used as x @ W
ROWS_STATE = NeuronLayout(axes=(0,), center=False, normalize=False)  # per-row state, no constraint


# Small tensors in long loops: one intra-op thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
# The update paths: the plain per-parameter reference, the foreach path, the fused kernel (where this
# version of Nero has one) and whatever the default picks.
_HAS_FUSED = "fused" in inspect.signature(Nero).parameters
PATHS = ["reference", "foreach", "default"] + (["fused"] if _HAS_FUSED else [])


def path_kw(path: str) -> dict:
    if path == "reference":
        return {"foreach": False}
    if path == "foreach":
        return {"foreach": True, **({"fused": False} if _HAS_FUSED else {})}
    if path == "fused":
        return {"fused": True}
    return {}


def mean_norm(t: torch.Tensor, layout: NeuronLayout):
    view, dims = layout.neuron_view(t.detach().double())
    return view.mean(dim=dims), torch.linalg.vector_norm(view, dim=dims)


def assert_balanced(t: torch.Tensor, layout: NeuronLayout, tol: float = 1e-5):
    mean, norm = mean_norm(t, layout)
    assert torch.isfinite(t).all()
    if layout.center:
        assert mean.abs().max().item() < tol, f"max |mean| {mean.abs().max().item():.3g}"
    if layout.normalize:
        assert (norm - 1).abs().max().item() < tol, f"max |norm - 1| {(norm - 1).abs().max().item():.3g}"


def angles(a: torch.Tensor, b: torch.Tensor, layout: NeuronLayout) -> torch.Tensor:
    """Per-neuron angle between the directions of ``a`` and ``b`` (fp64, accurate for small angles)."""
    va, dims = layout.neuron_view(a.detach().double())
    vb, _ = layout.neuron_view(b.detach().double())
    ua = va / torch.linalg.vector_norm(va, dim=dims, keepdim=True)
    ub = vb / torch.linalg.vector_norm(vb, dim=dims, keepdim=True)
    return 2 * torch.asin(torch.linalg.vector_norm(ua - ub, dim=dims) / 2)


def tangent_grad(w: torch.Tensor, layout: NeuronLayout, norm: float = 1.0, gen=None) -> torch.Tensor:
    """A random gradient in the tangent space of the balanced set at ``w`` (zero-mean, orthogonal to
    each neuron), with every neuron's gradient of norm ``norm``: what the parametrization gives."""
    g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    gv, dims = layout.neuron_view(g)
    wv, _ = layout.neuron_view(w.detach().double())
    gv = gv - gv.mean(dim=dims, keepdim=True)
    gv = gv - (gv * wv).sum(dim=dims, keepdim=True) * wv
    gv = gv / torch.linalg.vector_norm(gv, dim=dims, keepdim=True) * norm
    return gv.reshape(w.shape).to(w.dtype)


def balanced_param(shape, layout=ROWS, dtype=torch.float32) -> nn.Parameter:
    return nn.Parameter(layout.project(torch.randn(shape, dtype=torch.float64)).to(dtype))


# ---------------------------------------------------------------------------------------------
# the constraint
# ---------------------------------------------------------------------------------------------
LAYOUT_SHAPES = {
    "rows 2d": (ROWS, lambda a, b, c: (a, b + 1)),
    "rows conv": (ROWS, lambda a, b, c: (a, b + 1, c, c)),
    "cols (in,out)": (COLS, lambda a, b, c: (b + 1, a)),
    "grouped transposed": (GROUPED_T, lambda a, b, c: (2 * b + 2, a, c, c)),
    "two neuron axes": (NeuronLayout(axes=(0, 1)), lambda a, b, c: (a, b, c + 1)),
    "rows, no centring": (ROWS.with_(center=False), lambda a, b, c: (a, b + 1)),
    "rows, centring only": (ROWS.with_(normalize=False), lambda a, b, c: (a, b + 1)),
}


@given(
    case=st.sampled_from(sorted(LAYOUT_SHAPES)),
    dims=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3)),
    steps=st.integers(1, 25),
    lr=st.sampled_from([1e-3, 0.01, 0.1, 1.0]),
    beta=st.sampled_from([0.0, 0.9, 0.999]),
    path=st.sampled_from(PATHS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    grad_scale=st.sampled_from([1e-6, 1.0, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_every_constrained_neuron_is_balanced_after_any_number_of_steps(
    case, dims, steps, lr, beta, path, dtype, grad_scale, seed
):
    layout, make_shape = LAYOUT_SHAPES[case]
    shape = make_shape(*dims)
    assert layout.fan_in(shape) >= 2
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter((torch.randn(shape, generator=gen) * 3 + 1).to(dtype))  # far from balanced at start
    bias = nn.Parameter(torch.randn(dims[0], generator=gen).to(dtype))
    opt = Nero([{"params": [p], "layout": layout}, {"params": [bias]}], lr=lr, beta=beta, **path_kw(path))
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=gen).to(dtype) * grad_scale
        bias.grad = torch.randn(dims[0], generator=gen).to(dtype) * grad_scale
        opt.step()
        assert_balanced(p, layout, 1e-5)
    assert p.dtype == dtype and torch.isfinite(bias).all()


def test_auto_layout_balances_matrix_weights_along_axis_0_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.LayerNorm(5))
    before = copy.deepcopy(model)
    opt = Nero(model.parameters())
    x = torch.randn(8, 3, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for (name, p), (_, p0) in zip(model.named_parameters(), before.named_parameters()):
        if p.dim() > 1:
            assert_balanced(p, ROWS)
        else:
            # unconstrained: moved, but never projected (a LayerNorm gain of ones stays near 1)
            assert not torch.equal(p, p0)
            # each step moves an element by at most lr * s * sqrt(t) (|g_t| / sqrt(v_hat_t) <= sqrt(t))
            assert (p - p0).abs().max() < 6 * LR * max(p0.abs().mean().item(), 0.01) + 1e-6, name


# ---------------------------------------------------------------------------------------------
# the learning rate is the turning angle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout, shape", [(ROWS, (6, 32)), (COLS, (32, 6)), (GROUPED_T, (8, 3, 3, 3))])
@pytest.mark.parametrize("grad_norm", [1e-4, 1.0, 1e4])
@pytest.mark.parametrize("lr", [0.001, 0.01, 0.1])
def test_each_neuron_turns_by_atan_lr_per_step_with_tangent_gradients(layout, shape, grad_norm, lr):
    """Tangent gradients of constant norm: v_hat = ||g||^2 exactly (bias correction), so every neuron
    turns by exactly atan(lr) every step, whatever the gradient's scale."""
    gen = torch.Generator().manual_seed(1)
    p = balanced_param(shape, layout, torch.float64)
    opt = Nero([{"params": [p], "layout": layout}], lr=lr)
    for _ in range(20):
        w0 = p.detach().clone()
        p.grad = tangent_grad(p, layout, grad_norm, gen)
        opt.step()
        torch.testing.assert_close(angles(w0, p, layout), torch.full_like(angles(w0, p, layout), math.atan(lr)),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_steady_state_turning_angle_with_random_gradients_is_about_lr(clip):
    """Unprojected random gradients of varying size (a log-normal scale per step), default beta:
    after warm-up the paper's update (clip=None) turns each neuron by ~lr per step on average (a
    fan-in-256 gradient is almost tangent); the default cap (clip=1) turns no neuron by more than
    lr, so steps with a gradient above its running average are shortened and the mean is lower."""
    gen = torch.Generator().manual_seed(2)
    p = balanced_param((16, 256))
    opt = Nero([p], lr=LR, clip=clip)  # clip=1: the tightest cap, where its effect is largest
    measured = []
    for t in range(250):
        w0 = p.detach().clone()
        p.grad = torch.randn(p.shape, generator=gen) * torch.exp(torch.randn(1, generator=gen) * 0.3)
        opt.step()
        if t >= 100:
            measured.append(angles(w0, p, ROWS))
    a = torch.stack(measured)
    if clip is None:
        assert 0.9 * LR < a.mean().item() < 1.05 * LR
        assert a.max().item() > 1.2 * LR  # the uncapped update overshoots lr on large gradients
    else:
        # a step of norm lr from a unit vector turns it by at most asin(lr) (a tangent step: atan(lr))
        assert a.max().item() <= math.asin(LR) * (1 + 1e-6)
        assert 0.75 * LR < a.mean().item() < LR
    # every neuron turns at the same rate (the per-neuron normalisation)
    per_neuron = a.mean(dim=0)
    assert (per_neuron / per_neuron.mean() - 1).abs().max() < 0.05


def _spike_run(path: str, clip, lr=LR):
    """A (16, 64) balanced weight and a (16,) bias: 30 steps of small gradients, then one 1000x
    larger (a loss spike). Returns the weight's per-neuron angles and the bias's change at the spike."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    w = balanced_param((16, 64))
    b = nn.Parameter(torch.full((16,), 0.5))
    opt = Nero([{"params": [w], "layout": ROWS}, {"params": [b], "layout": ELEMENTWISE}], lr=lr, clip=clip,
               **path_kw(path))
    for t in range(31):
        scale = 1000.0 if t == 30 else 1.0
        w0, b0 = w.detach().clone(), b.detach().clone()
        w.grad = torch.randn(w.shape, generator=gen) * scale
        b.grad = torch.randn(b.shape, generator=gen) * scale
        opt.step()
    return angles(w0, w, ROWS), (b.detach() - b0).abs(), w.detach(), b.detach()


@pytest.mark.parametrize("path", PATHS)
def test_clip_caps_each_step_at_lr_on_a_gradient_spike(path):
    """v_hat is a slow average: a gradient 1000x its history makes the paper's step ~1/sqrt(1-beta)
    ~ 31 lr long. The default cap (clip=1) turns no neuron by more than lr and moves no element by
    more than lr * s (s = 0.5, the bias's mean magnitude); clip=None is the paper's update."""
    ang, db, w, b = _spike_run(path, clip=1.0)
    assert ang.max().item() <= math.asin(LR) * (1 + 1e-5)
    assert ang.min().item() > 0.9 * LR  # the spike's direction dominates: every neuron turns by ~lr
    assert db.max().item() <= LR * 0.5 * (1 + 1e-5)
    ang_paper, db_paper, _, _ = _spike_run(path, clip=None)
    assert ang_paper.min().item() > 5 * LR
    assert db_paper.max().item() > 5 * LR * 0.5
    # every route computes the same capped step
    _, _, w_ref, b_ref = _spike_run("reference", clip=1.0)
    torch.testing.assert_close(w, w_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(b, b_ref, atol=2e-6, rtol=1e-5)


def test_clip_steps_below_the_cap_are_unchanged():
    """Gradients of constant norm keep ||g|| = sqrt(v_hat): the cap never binds, so the step is the
    paper's bit for bit."""
    ws = []
    for clip in (1.0, None):
        torch.manual_seed(0)
        w = balanced_param((8, 32))
        opt = Nero([{"params": [w], "layout": ROWS}], lr=LR, clip=clip)
        g0 = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
        for _ in range(10):
            w.grad = g0.clone()
            opt.step()
        ws.append(w.detach().clone())
    torch.testing.assert_close(ws[0], ws[1], atol=0, rtol=0)


def _v_hat(opt, p):
    st = opt.state[p]
    return st["v"] / (1 - opt.param_groups[0]["beta"] ** st["step"])


@pytest.mark.parametrize("path", PATHS)
def test_running_average_takes_the_clipped_gradient(path):
    """clip_v (default): at a spike the sample entering v is clip^2 v_hat, so v_hat grows by at
    most clip^2 and the next ordinary steps keep their length; clip_v=False (the paper's average)
    lets one 1000x spike multiply v_hat ~30x and shrink every later step of that neuron."""
    out = {}
    for clip_v in (True, False):
        gen = torch.Generator().manual_seed(4)
        torch.manual_seed(0)
        w = balanced_param((8, 64))
        opt = Nero([{"params": [w], "layout": ROWS}], lr=LR, clip=2.0, clip_v=clip_v, **path_kw(path))
        after = []
        for t in range(60):
            w0 = w.detach().clone()
            w.grad = torch.randn(w.shape, generator=gen) * (1000.0 if t == 30 else 1.0)
            if t == 30:
                before = _v_hat(opt, w).clone()
            opt.step()
            if t == 30:
                jump = _v_hat(opt, w) / before
            if t > 30:
                after.append(angles(w0, w, ROWS))
        out[clip_v] = jump, torch.stack(after).mean()
    jump, mean_after = out[True]
    assert jump.max().item() <= 4.0 * (1 + 1e-5)  # v_hat's average of itself and clip^2 times itself
    assert jump.min().item() > 1.0
    assert 0.8 * LR < mean_after.item() < 1.2 * LR  # ordinary steps still turn ~lr
    jump_raw, mean_raw = out[False]
    assert jump_raw.min().item() > 20.0
    assert mean_raw.item() < 0.3 * LR  # the paper's average: the spike stalls the neuron


@pytest.mark.parametrize("path", PATHS)
def test_running_average_takes_a_first_gradient_whole(path):
    """A neuron whose gradient was zero so far has v = 0: its first non-zero gradient enters v
    whole (a limit of clip^2 * 0 would keep v at 0 for ever), elsewhere v takes the clipped one."""
    w = balanced_param((4, 16))
    opt = Nero([{"params": [w], "layout": ROWS}], lr=LR, **path_kw(path))
    gen = torch.Generator().manual_seed(6)
    for t in range(6):
        g = torch.randn(w.shape, generator=gen)
        if t < 5:
            g[0] = 0.0  # neuron 0 sees its first gradient at step 6
        w.grad = g
        v_before = opt.state[w]["v"].clone() if opt.state.get(w) else torch.zeros(4, 1)
        opt.step()
    sq = g[0].square().sum()
    torch.testing.assert_close(opt.state[w]["v"][0, 0], (1 - BETA) * sq, rtol=1e-5, atol=0)
    assert v_before[0, 0] == 0.0 and (opt.state[w]["v"] > 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_a_cap_below_one_keeps_the_running_average_honest(path):
    """A cap under 1 (a long chain) clips v's sample at the running rms itself, not below it: with
    gradients of steady norm v_hat stays ~||g||^2 instead of shrinking without end, and every step
    is at the cap (r ~ 1 > cap)."""
    gen = torch.Generator().manual_seed(12)
    w = balanced_param((6, 48))
    opt = Nero([{"params": [w], "layout": ROWS}], lr=LR, clip=0.5, **path_kw(path))
    for _ in range(300):
        w0 = w.detach().clone()
        w.grad = tangent_grad(w, ROWS, 3.0, gen)  # every neuron's gradient norm is 3
        opt.step()
    torch.testing.assert_close(_v_hat(opt, w), torch.full((6, 1), 9.0), rtol=0.02, atol=0)
    torch.testing.assert_close(angles(w0, w, ROWS), torch.full((6,), math.atan(0.5 * LR), dtype=torch.float64),
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("path", [p for p in PATHS if p != "reference"])
@pytest.mark.parametrize("clip, clip_v, factor", [(2.0, True, 1.0), (0.5, True, 1.0), (2.0, False, 1.0),
                                                  (2.0, True, 0.3)])
def test_clipped_running_average_is_the_same_on_every_path(path, clip, clip_v, factor):
    """Gradients whose scale jumps by e^N(0, 1.5) each step clip v's sample often; every path
    (and a per-tensor cap factor, as nerofy.wrap carries on a long chain) matches the reference."""
    from nerofy.optim import CARRIED_CLIP

    def run(kw):
        gen = torch.Generator().manual_seed(8)
        torch.manual_seed(1)
        w, b = balanced_param((6, 40)), nn.Parameter(torch.randn(6))
        for t in (w, b):
            setattr(t, CARRIED_CLIP, factor)
        opt = Nero([{"params": [w], "layout": ROWS}, {"params": [b], "layout": ELEMENTWISE}], lr=LR, clip=clip,
                   clip_v=clip_v, **kw)
        for _ in range(40):
            scale = torch.exp(torch.randn(1, generator=gen) * 1.5)
            w.grad = torch.randn(w.shape, generator=gen) * scale
            b.grad = torch.randn(b.shape, generator=gen) * scale
            opt.step()
        return w.detach(), b.detach(), opt.state[w]["v"], opt.state[b]["v"]

    got, want = run(path_kw(path)), run(path_kw("reference"))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_carried_cap_factor_shortens_the_step():
    """A tensor carrying a cap factor (nerofy.wrap on a long chain) turns by at most clip * factor * lr
    on a spike, in any group; one group's tensors with different factors each get their own cap."""
    from nerofy.optim import CARRIED_CLIP

    gen = torch.Generator().manual_seed(9)
    w1, w2 = balanced_param((8, 32)), balanced_param((8, 32))
    setattr(w2, CARRIED_CLIP, 0.25)
    opt = Nero([w1, w2], lr=LR)
    for t in range(20):
        a, b = w1.detach().clone(), w2.detach().clone()
        w1.grad = torch.randn(w1.shape, generator=gen) * (1e3 if t == 19 else 1.0)
        w2.grad = w1.grad.clone()
        opt.step()
    assert angles(a, w1, ROWS).max().item() <= math.asin(2 * LR) * (1 + 1e-5)
    assert angles(a, w1, ROWS).min().item() > 1.5 * LR
    assert angles(b, w2, ROWS).max().item() <= math.asin(0.5 * LR) * (1 + 1e-5)
    assert angles(b, w2, ROWS).min().item() > 0.45 * LR


@pytest.mark.parametrize("bad", [0, 1, "yes", None])
def test_clip_v_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="clip_v"):
        Nero([balanced_param((4, 8))], clip_v=bad)
    opt = Nero([balanced_param((4, 8))])
    with pytest.raises(ValueError, match="clip_v"):
        opt.add_param_group({"params": [balanced_param((4, 8))], "clip_v": bad})


@pytest.mark.parametrize("bad", [0, -1.0, "1", True, float("nan")])
def test_clip_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="clip"):
        Nero([balanced_param((4, 8))], clip=bad)
    opt = Nero([balanced_param((4, 8))])
    with pytest.raises(ValueError, match="clip"):
        opt.add_param_group({"params": [balanced_param((4, 8))], "clip": bad})


def test_clip_is_a_group_option_and_survives_state_dict():
    w1, w2 = balanced_param((4, 8)), balanced_param((4, 8))
    opt = Nero([{"params": [w1]}, {"params": [w2], "clip": None}], lr=LR)
    assert [g["clip"] for g in opt.param_groups] == [2.0, None]
    sd = opt.state_dict()
    opt2 = Nero([{"params": [w1]}, {"params": [w2]}], lr=LR)
    opt2.load_state_dict(sd)
    assert [g["clip"] for g in opt2.param_groups] == [2.0, None]
    # a checkpoint from before the option: its groups lack the key and get the default cap
    for g in sd["param_groups"]:
        del g["clip"]
    opt3 = Nero([{"params": [w1]}, {"params": [w2]}], lr=LR)
    opt3.load_state_dict(sd)
    w1.grad = torch.randn(w1.shape) * 1e3
    w2.grad = torch.randn(w2.shape)
    opt3.step()  # reads the missing key as the default


# ---------------------------------------------------------------------------------------------
# foreach == reference
# ---------------------------------------------------------------------------------------------
def _mixed_params(gen, dtype=torch.float32):
    return [
        {"params": [nn.Parameter(torch.randn(5, 7, generator=gen).to(dtype)),
                    nn.Parameter(torch.randn(4, 3, 2, 2, generator=gen).to(dtype)),
                    nn.Parameter(torch.randn(5, generator=gen).to(dtype)),
                    nn.Parameter(torch.zeros(3).to(dtype))]},
        {"params": [nn.Parameter(torch.randn(4, 3, 3, 3, generator=gen).to(dtype))], "layout": GROUPED_T},
        {"params": [nn.Parameter(torch.randn(7, 5, generator=gen).to(dtype))], "layout": COLS, "lr": 0.05},
        {"params": [nn.Parameter(torch.randn(9, 4, generator=gen).to(dtype))], "layout": ROWS_STATE},
        {"params": [nn.Parameter(torch.randn(6, 5, generator=gen).to(dtype))], "layout": ROWS.with_(center=False)},
    ]


@given(
    seed=st.integers(0, 2**16),
    steps=st.integers(1, 12),
    beta=st.sampled_from([0.0, 0.9, 0.999]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    bad=st.sampled_from(["none", "nan", "inf", "zero"]),
    path=st.sampled_from([p for p in PATHS if p != "reference"]),
)
def test_foreach_path_equals_reference_path(seed, steps, beta, dtype, bad, path):
    """foreach (and fused, and the default) == the plain per-parameter reference."""
    gen = torch.Generator().manual_seed(seed)
    groups_f = _mixed_params(gen, dtype)
    groups_r = [dict(g, params=[nn.Parameter(p.detach().clone()) for p in g["params"]]) for g in groups_f]
    opt_f = Nero(groups_f, beta=beta, **path_kw(path))
    opt_r = Nero(groups_r, beta=beta, foreach=False)
    pf = [p for g in opt_f.param_groups for p in g["params"]]
    pr = [p for g in opt_r.param_groups for p in g["params"]]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    for t in range(steps):
        for a, b in zip(pf, pr):
            g = torch.randn(a.shape, generator=gen)
            if t % 2 and a.dim() > 1:
                if bad == "nan":
                    g[0].view(-1)[0] = float("nan")
                elif bad == "inf":
                    g[-1].view(-1)[-1] = -float("inf")
                elif bad == "zero":
                    g[0] = 0.0
            a.grad, b.grad = g.to(dtype), g.to(dtype).clone()
        opt_f.step()
        opt_r.step()
    for a, b in zip(pf, pr):
        assert a.dtype == dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)
        sa, sb = opt_f.state[a], opt_r.state[b]
        assert sa["step"] == sb["step"] == steps and sa["scale"] == sb["scale"]
        assert sa["v"].dtype == sb["v"].dtype == torch.float32 and sa["v"].shape == sb["v"].shape
        torch.testing.assert_close(sa["v"], sb["v"], rtol=1e-4, atol=1e-7)


def test_nero_update_function_reports_the_same_skips_on_both_paths():
    def make():
        gen = torch.Generator().manual_seed(3)
        w = ROWS.project(torch.randn(4, 6, generator=gen))
        g = torch.randn(4, 6, generator=gen)
        g[1, 2] = float("nan")
        g[3] = float("inf")
        b = torch.randn(5, generator=gen)
        gb = torch.randn(5, generator=gen)
        gb[0] = float("nan")
        return [(w, g, torch.zeros(4, 1), ROWS, 1, 1.0)], [(b, gb, torch.zeros(5), 1, 0.5)]

    kw = dict(lr=LR, beta=BETA, eps=1e-16)
    nr, er = make()
    assert nero_update(nr, er, foreach=False, **kw) == 3
    variants = [dict(foreach=True)] + ([dict(foreach=True, fused=True)] if _HAS_FUSED else [])
    for extra in variants:
        nf, ef = make()
        assert nero_update(nf, ef, **extra, **kw) == 3, extra
        for i in (0, 2):  # weights and second moments
            a, b = nf[0][i], nr[0][i]
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            a, b = ef[0][i], er[0][i]
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# state: one fp32 scalar per neuron, one per unconstrained element
# ---------------------------------------------------------------------------------------------
class Zoo(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(6, 5)                                              # 5 neurons + 5 bias
        self.conv = nn.Conv2d(3, 4, 3)                                          # 4 neurons + 4 bias
        self.convt = nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False)          # 6 neurons
        self.norm = nn.LayerNorm(5)                                             # 5 + 5 elements
        self.lin1 = nn.Linear(1, 3, bias=False)                                 # fan-in 1: 3 elements
        self.emb = nn.Embedding(10, 4)                                          # 10 rows (unconstrained)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.to(dtype)

    def groups(self):
        return [
            {"params": [self.lin.weight, self.lin.bias, self.conv.weight, self.conv.bias,
                        self.norm.weight, self.norm.bias, self.lin1.weight]},
            {"params": [self.convt.weight], "layout": GROUPED_T},
            {"params": [self.emb.weight], "layout": ROWS_STATE},
            {"params": list(self.frozen.parameters())},
        ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_state_is_one_fp32_scalar_per_neuron_plus_one_per_unconstrained_element(dtype):
    z = Zoo(dtype)
    opt = Nero(z.groups())
    for p in z.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape).to(dtype)
    opt.step()
    expected = {
        z.lin.weight: 5, z.lin.bias: 5, z.conv.weight: 4, z.conv.bias: 4, z.convt.weight: 6,
        z.norm.weight: 5, z.norm.bias: 5, z.lin1.weight: 3, z.emb.weight: 10,
    }
    assert set(opt.state.keys()) == set(expected)  # frozen parameters get no state
    for p, n in expected.items():
        st_ = opt.state[p]
        assert set(st_) == {"step", "v", "scale"}
        assert st_["v"].dtype == torch.float32 and st_["v"].numel() == n
        assert st_["step"] == 1 and isinstance(st_["scale"], float)
    total = sum(opt.state[p]["v"].numel() for p in expected)
    assert total == 47
    # versus Adam's two values per weight
    assert total < sum(p.numel() for p in expected) / 4


def test_constrained_state_has_scale_one_and_unconstrained_scale_is_the_mean_magnitude():
    w = balanced_param((4, 8))
    b = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    zero = nn.Parameter(torch.zeros(3))
    emb = nn.Parameter(torch.randn(5, 4))
    opt = Nero([{"params": [w, b, zero]}, {"params": [emb], "layout": ROWS_STATE}], scale_floor=0.02)
    for p in (w, b, zero, emb):
        p.grad = torch.randn(p.shape)
    b0, emb0 = b.detach().clone(), emb.detach().clone()
    opt.step()
    assert opt.state[w]["scale"] == 1.0
    assert opt.state[b]["scale"] == pytest.approx(3.5 / 3)
    assert opt.state[zero]["scale"] == 0.02
    assert opt.state[emb]["scale"] == pytest.approx(emb0.norm(dim=1).mean().item(), rel=1e-6)
    # bias-corrected first step: every element moves by exactly lr * s against its gradient's sign
    torch.testing.assert_close(b, b0 - LR * (3.5 / 3) * torch.sign(b.grad))
    torch.testing.assert_close(zero.detach(), -LR * 0.02 * torch.sign(zero.grad))
    # per-row state: each row moves by lr * s along its own gradient direction
    g = emb.grad
    torch.testing.assert_close(emb, emb0 - LR * opt.state[emb]["scale"] * g / g.norm(dim=1, keepdim=True))


def test_unconstrained_fan_in_1_layout_keeps_one_state_value_per_neuron():
    p = nn.Parameter(torch.tensor([3.0, -1.0, 2.0]))
    opt = Nero([{"params": [p], "layout": ROWS_STATE}])
    p.grad = torch.tensor([1.0, 0.0, 0.0])
    opt.step()
    assert opt.state[p]["v"].numel() == 3
    assert opt.state[p]["scale"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_params_fp32_state_no_nan(dtype, tol):
    gen = torch.Generator().manual_seed(4)
    w = nn.Parameter(torch.randn(8, 64, generator=gen).to(dtype))
    convt = nn.Parameter(torch.randn(4, 3, 3, 3, generator=gen).to(dtype))
    b = nn.Parameter(torch.randn(8, generator=gen).to(dtype))
    tiny = nn.Parameter(torch.full((8, 64), 1e-4).to(dtype))  # fp16: squared norms underflow
    opt = Nero([{"params": [w, b, tiny]}, {"params": [convt], "layout": GROUPED_T}])
    w_start = w.detach().float().clone()
    for _ in range(30):
        for p in (w, b, convt):
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)  # squares underflow in fp16
        tiny.grad = torch.full(tiny.shape, 1e-4).to(dtype)
        opt.step()
    for p in (w, b, convt, tiny):
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert opt.state[p]["v"].dtype == torch.float32 and torch.isfinite(opt.state[p]["v"]).all()
    assert (opt.state[w]["v"] > 0).all()  # fp32 state did not underflow
    assert_balanced(w.float(), ROWS, tol)
    assert_balanced(convt.float(), GROUPED_T, tol)
    turned = angles(ROWS.project(w_start), w.float(), ROWS)
    assert (turned > 2 * LR).all()  # the weights really moved (a random walk of 30 steps of lr)


def test_fp16_gradient_overflow_to_inf_is_skipped():
    w = balanced_param((4, 16), dtype=torch.float16)
    opt = Nero([w])
    g = torch.randn(4, 16)
    g[2, 0] = 1e6  # not representable in fp16: inf
    w.grad = g.half()
    w0 = w.detach().clone()
    opt.step()
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[2], w0[2], rtol=0, atol=2e-3)
    assert not torch.allclose(w[0], w0[0], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# torch integration
# ---------------------------------------------------------------------------------------------
def test_lr_scheduler_changes_the_turning_angle():
    gen = torch.Generator().manual_seed(5)
    p = balanced_param((4, 16), dtype=torch.float64)
    opt = Nero([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    for k in range(6):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** k)
        w0 = p.detach().clone()
        p.grad = tangent_grad(p, ROWS, 1.0, gen)
        opt.step()
        sched.step()
        torch.testing.assert_close(angles(w0, p, ROWS), torch.full((4,), math.atan(0.1 * 0.5 ** k), dtype=torch.float64),
                                   rtol=1e-6, atol=0)


def test_lr_zero_freezes_balanced_weights_and_step_lr_scheduler():
    p = balanced_param((4, 16))
    opt = Nero([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    p.grad = torch.randn(4, 16)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    w0 = p.detach().clone()
    p.grad = torch.randn(4, 16)
    opt.step()
    torch.testing.assert_close(p.detach(), w0, rtol=0, atol=1e-6)


def _mlp():
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def test_grad_scaler_on_cpu_matches_unscaled_training_and_skips_inf_steps():
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    ref, model = _mlp(), _mlp()
    opt_ref, opt = Nero(ref.parameters()), Nero(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
    assert scaler.is_enabled()

    def scaled_step(inject_inf=False):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if inject_inf:
            model[0].weight.grad[3, 1] = float("inf")
        scaler.step(opt)
        scaler.update()

    def ref_step():
        opt_ref.zero_grad()
        F.mse_loss(ref(x), y).backward()
        opt_ref.step()

    # 1) a step skipped because of inf: nothing moves, no state is created, the scale backs off
    before = copy.deepcopy(model.state_dict())
    scaled_step(inject_inf=True)
    assert scaler.get_scale() == 2.0 ** 11
    assert len(opt.state) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # 2) then scaled training follows unscaled training (power-of-two scaling is exact)
    for _ in range(5):
        scaled_step()
        ref_step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert opt.state[a]["step"] == opt_ref.state[b]["step"] == 5
    # 3) an inf in the middle of training: skipped, state untouched
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    v_snap = [opt.state[p]["v"].clone() for p in model.parameters()]
    scaled_step(inject_inf=True)
    assert all(opt.state[p]["step"] == 5 for p in model.parameters())
    assert all(torch.equal(opt.state[p]["v"], v) for p, v in zip(model.parameters(), v_snap))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def _resume_setup(seed=7):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(6, 10, generator=gen),
        "b": torch.randn(6, generator=gen),
        "ct": torch.randn(4, 3, 3, 3, generator=gen),
        "cols": torch.randn(10, 3, generator=gen),
        "emb": torch.randn(12, 4, generator=gen),
        "h": torch.randn(5, 8, generator=gen).half(),
        "bf": torch.randn(8, generator=gen).bfloat16(),
    }
    return {k: nn.Parameter(v) for k, v in params.items()}


def _resume_opt(ps):
    opt = Nero([
        {"params": [ps["w"], ps["b"], ps["h"], ps["bf"]]},
        {"params": [ps["ct"]], "layout": GROUPED_T, "lr": 0.03},
        {"params": [ps["cols"]], "layout": COLS, "beta": 0.99},
        {"params": [ps["emb"]], "layout": ROWS_STATE},
    ], lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return opt, sched


def _resume_step(ps, opt, sched, t):
    gen = torch.Generator().manual_seed(1000 + t)
    for k, p in ps.items():
        if k == "emb" and t < 4:
            p.grad = None  # starts training late: its own step counter
        else:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    if t == 5:
        ps["w"].grad[2, 3] = float("nan")
    opt.step()
    sched.step()


def test_resume_from_torch_save_equals_an_uninterrupted_run_bit_exact():
    n1, n2 = 6, 7
    ps_a = _resume_setup()
    opt_a, sched_a = _resume_opt(ps_a)
    for t in range(n1 + n2):
        _resume_step(ps_a, opt_a, sched_a, t)

    ps_b = _resume_setup()
    opt_b, sched_b = _resume_opt(ps_b)
    for t in range(n1):
        _resume_step(ps_b, opt_b, sched_b, t)
    buf = io.BytesIO()
    torch.save({"params": {k: p.detach() for k, p in ps_b.items()}, "opt": opt_b.state_dict(),
                "sched": sched_b.state_dict()}, buf)
    del ps_b, opt_b, sched_b
    buf.seek(0)
    ck = torch.load(buf)  # default weights_only=True: the state dict holds only plain types
    buf.seek(0)
    torch.load(buf, weights_only=True)
    ps_c = {k: nn.Parameter(v.clone()) for k, v in ck["params"].items()}
    opt_c, sched_c = _resume_opt(_resume_setup(seed=99))  # different weights: all of it is overwritten
    opt_c, sched_c = _resume_opt(ps_c)
    opt_c.load_state_dict(ck["opt"])
    sched_c.load_state_dict(ck["sched"])
    for p in ps_c.values():
        assert opt_c.state[p]["v"].dtype == torch.float32  # even for fp16/bf16 parameters
    assert opt_c.param_groups[1]["layout"] == GROUPED_T and opt_c.param_groups[3]["layout"] == ROWS_STATE
    for t in range(n1, n1 + n2):
        _resume_step(ps_c, opt_c, sched_c, t)

    for k in ps_a:
        assert torch.equal(ps_a[k], ps_c[k]), k
        sa, sc = opt_a.state[ps_a[k]], opt_c.state[ps_c[k]]
        assert sa["step"] == sc["step"] and sa["scale"] == sc["scale"]
        assert torch.equal(sa["v"], sc["v"]), k
    assert opt_a.state[ps_a["emb"]]["step"] == n1 + n2 - 4
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]


def test_state_dict_round_trip_is_plain_and_reloads_into_the_same_optimizer():
    ps = _resume_setup()
    opt, sched = _resume_opt(ps)
    for t in range(3):
        _resume_step(ps, opt, sched, t)
    sd = opt.state_dict()
    assert sd["param_groups"][1]["layout"] == {"axes": [1], "split_axis": 0, "groups": 2, "center": True,
                                              "normalize": True}
    assert sd["param_groups"][0]["layout"] == "auto"
    assert isinstance(opt.param_groups[1]["layout"], NeuronLayout)  # the live optimizer is untouched
    opt.load_state_dict(copy.deepcopy(sd))
    sd2 = opt.state_dict()
    assert sd2["param_groups"] == sd["param_groups"]
    for k in sd["state"]:
        assert torch.equal(sd["state"][k]["v"], sd2["state"][k]["v"])


def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned():
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    a, b = _mlp(), _mlp()
    opt_a, opt_b = Nero(a.parameters()), Nero(b.parameters())
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt_a.zero_grad()
        loss = F.mse_loss(a(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt_a.step(closure)
        opt_b.zero_grad()
        ref_loss = F.mse_loss(b(x), y)
        ref_loss.backward()
        assert opt_b.step() is None
        assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    with torch.no_grad():
        opt_a.step(closure)  # the closure gets grad mode even when step is called under no_grad
    assert calls == [True] * 4
    for p, q in zip(list(a.parameters()), list(b.parameters())):
        assert opt_a.state[p]["step"] == 4 and opt_b.state[q]["step"] == 3


def test_zero_grad_set_to_none_true_and_false():
    w, b = balanced_param((4, 8)), nn.Parameter(torch.randn(4))
    opt = Nero([w, b])
    w.grad, b.grad = torch.randn(4, 8), torch.randn(4)
    opt.step()
    v1 = opt.state[w]["v"].clone()
    w1, b1 = w.detach().clone(), b.detach().clone()

    opt.zero_grad(set_to_none=True)
    assert w.grad is None and b.grad is None
    opt.step()  # nothing to do
    assert opt.state[w]["step"] == 1 and torch.equal(w, w1) and torch.equal(b, b1)

    w.grad, b.grad = torch.randn(4, 8), torch.randn(4)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(w.grad, torch.zeros(4, 8)) and torch.equal(b.grad, torch.zeros(4))
    opt.step()  # a zero gradient: counted as a step, v decays, weights stay put
    assert opt.state[w]["step"] == opt.state[b]["step"] == 2
    torch.testing.assert_close(opt.state[w]["v"], v1 * BETA)
    torch.testing.assert_close(w.detach(), w1, rtol=0, atol=1e-6)
    assert torch.equal(b, b1)


def test_parameter_that_starts_late_gets_its_own_bias_correction():
    a = balanced_param((4, 8))
    late = balanced_param((3, 8))
    late_copy = nn.Parameter(late.detach().clone())
    opt = Nero([a, late])
    for _ in range(5):
        a.grad = torch.randn(4, 8)
        opt.step()
    assert late not in opt.state
    late0 = late.detach().clone()
    g = torch.randn(3, 8)
    a.grad, late.grad = torch.randn(4, 8), g.clone()
    opt.step()
    assert opt.state[a]["step"] == 6 and opt.state[late]["step"] == 1
    fresh = Nero([late_copy])
    late_copy.grad = g.clone()
    fresh.step()
    torch.testing.assert_close(late, late_copy, rtol=0, atol=1e-7)
    torch.testing.assert_close(opt.state[late]["v"], fresh.state[late_copy]["v"], rtol=0, atol=0)
    # a first step turns each neuron by <= atan(lr) (bias-corrected: v_hat = ||g||^2), not by the
    # ~sqrt(1 - beta^6) / sqrt(1 - beta) ~ 2.4x larger angle a shared step counter would give
    turned = angles(late0, late, ROWS)
    assert (turned <= math.atan(LR) + 1e-6).all() and (turned > 0.5 * LR).all()


def test_param_groups_have_their_own_lr():
    gen = torch.Generator().manual_seed(8)
    p1, p2 = balanced_param((3, 16), dtype=torch.float64), balanced_param((3, 16), dtype=torch.float64)
    opt = Nero([{"params": [p1]}, {"params": [p2], "lr": 0.1}], lr=0.01)
    w1, w2 = p1.detach().clone(), p2.detach().clone()
    p1.grad, p2.grad = tangent_grad(p1, ROWS, 1.0, gen), tangent_grad(p2, ROWS, 1.0, gen)
    opt.step()
    torch.testing.assert_close(angles(w1, p1, ROWS), torch.full((3,), math.atan(0.01), dtype=torch.float64))
    torch.testing.assert_close(angles(w2, p2, ROWS), torch.full((3,), math.atan(0.1), dtype=torch.float64))


def test_project_method_rebalances_after_manual_edits():
    w = balanced_param((4, 8))
    ct = balanced_param((4, 3, 2, 2), GROUPED_T, torch.float16)
    b = nn.Parameter(torch.randn(4))
    opt = Nero([{"params": [w, b]}, {"params": [ct], "layout": GROUPED_T}])
    b0 = b.detach().clone()
    with torch.no_grad():
        w.mul_(3).add_(1)
        ct.mul_(2).add_(0.5)
    opt.project_()
    assert_balanced(w, ROWS)
    assert_balanced(ct.float(), GROUPED_T, 5e-3)
    assert torch.equal(b, b0)


def test_frozen_and_gradless_parameters_are_untouched():
    z = Zoo()
    opt = Nero(z.groups())
    before = copy.deepcopy(z.state_dict())
    z.lin.weight.grad = torch.randn(5, 6)
    opt.step()
    for k, v in z.state_dict().items():
        assert torch.equal(v, before[k]) == (k != "lin.weight"), k
    assert list(opt.state.keys()) == [z.lin.weight]


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Nero(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_training_a_small_model_lowers_the_loss():
    torch.manual_seed(9)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 3))
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = Nero(model.parameters(), lr=0.05)
    first = F.mse_loss(model(x), y).item()
    for _ in range(80):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert F.mse_loss(model(x), y).item() < 0.5 * first


# ---------------------------------------------------------------------------------------------
# zero gradients, zero rows, fan-in 1, non-finite gradients: never NaN
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_zero_gradients_never_produce_nan(path):
    w = balanced_param((4, 8))
    b = nn.Parameter(torch.randn(4))
    opt = Nero([w, b], **path_kw(path))
    w0, b0 = w.detach().clone(), b.detach().clone()
    for _ in range(10):  # zero from the very first step: v stays 0
        w.grad, b.grad = torch.zeros(4, 8), torch.zeros(4)
        opt.step()
    assert torch.equal(opt.state[w]["v"], torch.zeros(4, 1)) and torch.equal(opt.state[b]["v"], torch.zeros(4))
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=1e-6)
    assert torch.equal(b, b0)
    # then a real gradient: finite, and the weights move
    w.grad, b.grad = torch.randn(4, 8), torch.randn(4)
    opt.step()
    assert torch.isfinite(w).all() and torch.isfinite(b).all() and not torch.equal(b, b0)
    assert_balanced(w, ROWS)


@pytest.mark.parametrize("path", PATHS)
def test_all_zero_weight_rows_never_produce_nan(path):
    w = nn.Parameter(torch.randn(5, 8))
    with torch.no_grad():
        w[1] = 0.0
        w[3] = 2.5  # constant: zero once centred
    opt = Nero([w], **path_kw(path))
    for t in range(5):
        g = torch.randn(5, 8)
        g[1] = 0.0  # a dead row with a dead gradient
        w.grad = g
        opt.step()
        assert torch.isfinite(w).all() and torch.isfinite(opt.state[w]["v"]).all()
    assert torch.equal(w[1], torch.zeros(8))  # no direction, no gradient: stays zero (not NaN)
    assert_balanced(w[[0, 2, 3, 4]], ROWS)  # the constant row got a direction from its gradient


@pytest.mark.parametrize("path", PATHS)
def test_fan_in_1_neurons_are_updated_per_element_never_nan(path, caplog):
    lin1 = nn.Linear(1, 6)                                    # weight (6, 1): auto -> per element
    dw = nn.Parameter(torch.randn(7, 1, 1, 1))                # 1x1 depthwise conv, explicit rows layout
    opt = Nero([{"params": list(lin1.parameters())}, {"params": [dw], "layout": ROWS}], **path_kw(path))
    w0, dw0 = lin1.weight.detach().clone(), dw.detach().clone()
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        for _ in range(3):
            lin1.weight.grad, lin1.bias.grad, dw.grad = torch.ones(6, 1), torch.ones(6), -torch.ones(7, 1, 1, 1)
            opt.step()
    for p in (lin1.weight, dw):
        assert torch.isfinite(p).all() and (p != 0).all()
        assert opt.state[p]["v"].numel() == p.numel()
    s_w, s_dw = w0.abs().mean().item(), dw0.abs().mean().item()
    torch.testing.assert_close(lin1.weight.detach(), w0 - 3 * LR * s_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw.detach(), dw0 + 3 * LR * s_dw, rtol=1e-5, atol=1e-7)


def test_fan_in_1_under_a_constrained_layout_logs_a_warning(caplog):
    dw = nn.Parameter(torch.randn(13, 1, 1, 1))  # a shape no other test uses (the warning is logged once)
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        opt = Nero([{"params": [dw], "layout": ROWS}])
        dw.grad = torch.randn(13, 1, 1, 1)
        opt.step()
    assert any("fan-in 1" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_does_not_poison_the_weights(path, dtype, bad, caplog):
    w = balanced_param((4, 8), dtype=dtype)
    ct = balanced_param((4, 3, 2, 2), GROUPED_T, dtype)
    b = nn.Parameter(torch.randn(5).to(dtype))
    opt = Nero([{"params": [w, b]}, {"params": [ct], "layout": GROUPED_T}], **path_kw(path))
    for p in (w, b, ct):  # one clean step so that v > 0
        p.grad = torch.randn(p.shape).to(dtype)
    opt.step()
    w0, b0, ct0 = w.detach().clone(), b.detach().clone(), ct.detach().clone()
    v_w, v_b, v_ct = (opt.state[p]["v"].clone() for p in (w, b, ct))
    gw, gb, gct = torch.randn(4, 8), torch.randn(5), torch.randn(4, 3, 2, 2)
    gw[1, 5] = bad
    gb[2] = bad
    gct[2, 1, 0, 1] = bad  # input channel 2 is in group 1: neuron (group 1, out-column 1) = output channel 4
    w.grad, b.grad, ct.grad = gw.to(dtype), gb.to(dtype), gct.to(dtype)
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        opt.step()
    assert any("non-finite" in r.getMessage() for r in caplog.records)
    for p in (w, b, ct):
        assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["v"]).all()
    atol = 1e-6 if dtype == torch.float32 else 2e-3
    # the bad neuron / element stays where it was, its second moment decays as for a zero gradient
    torch.testing.assert_close(w[1], w0[1], rtol=0, atol=atol)
    assert b[2] == b0[2]
    torch.testing.assert_close(opt.state[w]["v"][1], v_w[1] * BETA)
    torch.testing.assert_close(opt.state[b]["v"][2], v_b[2] * BETA)
    ctv, ct0v = GROUPED_T.neuron_view(ct)[0], GROUPED_T.neuron_view(ct0)[0]
    torch.testing.assert_close(ctv[1, :, 1], ct0v[1, :, 1], rtol=0, atol=atol)
    vct = opt.state[ct]["v"]
    torch.testing.assert_close(vct[1, :, 1], v_ct[1, :, 1] * BETA)
    # everything else stepped normally
    for r in (0, 2, 3):
        assert angles(w0[r:r + 1], w[r:r + 1].float().to(w0.dtype), ROWS).item() > 0.5 * LR
    assert (b[[0, 1, 3, 4]] != b0[[0, 1, 3, 4]]).all()
    moved = angles(ct0.double(), ct.double(), GROUPED_T)
    assert moved.shape == (2, 3)  # (group, column within the group)
    if dtype == torch.float32:
        assert moved[1, 1] < 1e-2 * LR
    others = torch.ones_like(moved, dtype=torch.bool)
    others[1, 1] = False
    assert (moved[others] > 0.5 * LR).all()


@pytest.mark.parametrize("path", PATHS)
def test_skip_nonfinite_false_lets_nan_through_as_documented(path):
    w = balanced_param((4, 8))
    opt = Nero([w], skip_nonfinite=False, **path_kw(path))
    g = torch.randn(4, 8)
    g[1, 5] = float("nan")
    w.grad = g
    opt.step()
    assert torch.isnan(w[1]).all() and torch.isfinite(w[[0, 2, 3]]).all()


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _p():
    return nn.Parameter(torch.randn(3, 4))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Nero([1.0, 2.0]),
        lambda: Nero([_p(), "weight"]),
        lambda: Nero([{"params": [_p(), 3]}]),
        lambda: Nero([]),
        lambda: Nero([_p()], lr=-0.01),
        lambda: Nero([_p()], lr=float("nan")),
        lambda: Nero([_p()], lr=float("inf")),
        lambda: Nero([_p()], lr="0.01"),
        lambda: Nero([{"params": [_p()], "lr": -1.0}]),
        lambda: Nero([_p()], beta=1.0),
        lambda: Nero([_p()], beta=-0.1),
        lambda: Nero([_p()], beta=1.5),
        lambda: Nero([_p()], beta=float("nan")),
        lambda: Nero([{"params": [_p()], "beta": 1.0}]),
        lambda: Nero([_p()], eps=0.0),
        lambda: Nero([_p()], scale_floor=-1.0),
        lambda: Nero([_p()], layout="rows"),
        lambda: Nero([{"params": [_p()], "layout": NeuronLayout(axes=(2,))}]),
        lambda: Nero([{"params": [nn.Parameter(torch.randn(3, 4, 3, 3))],
                       "layout": NeuronLayout(axes=(1,), split_axis=0, groups=2)}]),
    ],
)
def test_bad_input_raises_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_add_param_group_validates():
    opt = Nero([_p()])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [_p()], "lr": -1.0})
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [_p()], "beta": 1.0})
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [_p()], "layout": NeuronLayout(axes=(3,))})
    opt.add_param_group({"params": [_p()], "layout": {"axes": [1], "center": False}})
    assert opt.param_groups[-1]["layout"] == NeuronLayout(axes=(1,), center=False)


def test_accepts_a_single_tensor_a_generator_and_dict_layouts():
    p = _p()
    assert len(Nero(p).param_groups[0]["params"]) == 1
    assert len(Nero(nn.Linear(3, 4).parameters()).param_groups[0]["params"]) == 2
    opt = Nero([{"params": [p], "layout": {"axes": [-1]}}], layout="elementwise")
    assert opt.param_groups[0]["layout"] == COLS and opt.defaults["layout"] == ELEMENTWISE


@pytest.mark.parametrize("path", PATHS)
def test_tensor_lr_is_either_rejected_or_works(path):
    try:
        Nero([_p()], lr=torch.tensor(0.01), **path_kw(path))
    except ValueError:
        return  # rejecting it up front is fine
    torch.manual_seed(0)
    w, b = balanced_param((3, 4)), nn.Parameter(torch.randn(3))
    w2, b2 = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    opt_t = Nero([w, b], lr=torch.tensor(0.01), **path_kw(path))
    opt_f = Nero([w2, b2], lr=0.01, **path_kw(path))
    w.grad, b.grad = torch.randn(3, 4), torch.randn(3)
    w2.grad, b2.grad = w.grad.clone(), b.grad.clone()
    opt_t.step()
    opt_f.step()
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(b, b2)


@pytest.mark.parametrize("params", [None, 5, [{"params": None}], [{"params": 1.5}]])
def test_non_iterable_params_raise_value_error(params):
    with pytest.raises(ValueError):
        Nero(params)


def test_weight_decay_zero_is_accepted_anything_else_is_one_clear_error():
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    opt = Nero([{"params": [w], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0}], weight_decay=0.0, foreach=True)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()  # factories' keywords and group keys at 0 change nothing
    assert opt.state[w]["step"] == 1
    for bad in (1e-4, 0.05, True, "0"):
        with pytest.raises(ValueError, match="Nero has no weight decay") as err:
            Nero([w], weight_decay=bad)
        assert "weight_decay=0" in str(err.value)
    with pytest.raises(ValueError, match="Nero has no weight decay"):
        Nero([{"params": [w], "weight_decay": 0.01}])
    with pytest.raises(ValueError, match="Nero has no weight decay"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.1})
