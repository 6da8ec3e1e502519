"""Complex weights (spectral layers such as a Fourier neural operator's): a complex weight is a pair of
real ones, so a balanced complex neuron has complex mean 0 and norm sqrt(sum |w|^2) = 1, the
parametrization's backward uses the real inner product Re <u, g>, and Nero's second moment is |g|^2."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy
from nerofy import Balanced, Nero, NeuronLayout, balance
from nerofy.balanced import fill_dead_
from nerofy.check import check_model
from nerofy.optim import nero_update
from nerofy.verify import verify_axes

LAYOUTS = [NeuronLayout(axes=(0,)), NeuronLayout(axes=(1, 2)), NeuronLayout(axes=(0,), center=False)]


def _balanced_stats(w, layout):
    view, dims = layout.neuron_view(w.detach().to(torch.complex128))
    return view.mean(dim=dims).abs().max().item(), (torch.linalg.vector_norm(view, dim=dims) - 1).abs().max().item()


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_parametrized_complex_weight_is_balanced_and_backward_matches_autograd(layout):
    torch.manual_seed(0)
    v = torch.randn(4, 5, 3, dtype=torch.complex128, requires_grad=True)
    w = Balanced(layout, scale=1.5)(v)
    assert w.dtype == torch.complex128
    view, dims = layout.neuron_view(w.detach() / 1.5)
    if layout.center:
        assert view.mean(dim=dims).abs().max() < 1e-12
    assert (torch.linalg.vector_norm(view, dim=dims) - 1).abs().max() < 1e-12

    # the analytic backward against autograd through the plain formula, for a real loss
    target = torch.randn(4, 5, 3, dtype=torch.complex128)
    loss_fn = lambda w: (w * target).real.sum() + (w.abs() ** 3).sum()  # noqa: E731
    g_fn, = torch.autograd.grad(loss_fn(w), v)
    v2 = v.detach().clone().requires_grad_()
    vv, d = layout.neuron_view(v2)
    c = vv - vv.mean(dim=d, keepdim=True) if layout.center else vv
    w2 = (1.5 * c / torch.linalg.vector_norm(c, dim=d, keepdim=True)).reshape(v2.shape)
    g_ref, = torch.autograd.grad(loss_fn(w2), v2)
    torch.testing.assert_close(g_fn, g_ref, rtol=1e-10, atol=1e-12)


def test_complex_right_inverse_and_dead_neurons():
    lin = nn.Linear(6, 4, bias=False)
    lin.weight = nn.Parameter(torch.randn(4, 6, dtype=torch.complex64))
    with torch.no_grad():
        lin.weight[1] = 2 + 3j  # constant row: zero once centred, so it needs a direction
    balance(lin, "weight", NeuronLayout(axes=(0,)))
    mean, dev = _balanced_stats(lin.weight, NeuronLayout(axes=(0,)))
    assert mean < 1e-6 and dev < 1e-5
    assert lin.weight.detach()[1].imag.abs().sum() > 0  # the filled direction is complex, not real only
    t = torch.zeros(3, 4, dtype=torch.complex64)
    assert fill_dead_(t, NeuronLayout(axes=(0,))) == 3


def test_nero_step_on_complex_weights_is_the_formula_with_abs_squared():
    torch.manual_seed(1)
    lay = NeuronLayout(axes=(0,))
    w = lay.project(torch.randn(3, 8, dtype=torch.complex64))
    g = torch.randn(3, 8, dtype=torch.complex64)
    v = torch.zeros(3, 1)
    we, ge, ve = torch.randn(5, dtype=torch.complex64), torch.randn(5, dtype=torch.complex64), torch.zeros(5)
    w0, we0 = w.clone(), we.clone()
    lr, beta = 0.05, 0.9
    nero_update([(w, g, v, lay, 1, 1.0)], [(we, ge, ve, 1, 0.5)], lr=lr, beta=beta, eps=1e-16)

    sq = (g.abs() ** 2).sum(1, keepdim=True)
    torch.testing.assert_close(v, (1 - beta) * sq)
    step = w0 - lr * g / (v / (1 - beta)).sqrt()
    step = step - step.mean(1, keepdim=True)
    torch.testing.assert_close(w, step / torch.linalg.vector_norm(step, dim=1, keepdim=True))
    torch.testing.assert_close(ve, (1 - beta) * ge.abs() ** 2)
    torch.testing.assert_close(we, we0 - lr * 0.5 * ge / (ve / (1 - beta)).sqrt())
    assert v.dtype == ve.dtype == torch.float32


class SpectralConv(nn.Module):
    """A Fourier layer: low modes mixed by a complex weight (in, out, mx, my)."""

    def __init__(self, c=4, modes=5):
        super().__init__()
        self.modes = modes
        self.lift = nn.Conv2d(1, c, 1)
        self.w = nn.Parameter(torch.randn(c, c, modes, modes, dtype=torch.cfloat) / c)
        self.skip = nn.Conv2d(c, c, 1)
        self.proj = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        x = self.lift(x)
        ft = torch.fft.rfft2(x)
        out = torch.zeros_like(ft)
        m = self.modes
        out[:, :, :m, :m] = torch.einsum("bixy,ioxy->boxy", ft[:, :, :m, :m], self.w)
        y = torch.fft.irfft2(out, s=x.shape[-2:]) + self.skip(x)
        return self.proj(F.gelu(y))


def test_spectral_layer_plans_wraps_and_trains():
    torch.manual_seed(0)
    model = SpectralConv()
    x = torch.randn(8, 1, 12, 12)
    target = torch.roll(x, 1, dims=-1).neg()
    plan = nerofy.plan(model, (x,))
    e = plan["w"]
    # einsum "bixy,ioxy->boxy" sums over i (axis 0): each (o, x, y) is a neuron with fan-in c
    assert (e.role, e.axes) == ("neuron", (1, 2, 3))

    r = check_model(SpectralConv(), (x,), steps=2, plan_inputs=(x,))
    assert r.status == "pass", r.error
    # the axis check replays the einsum on complex values: the planned axes pass, a wrong one fails
    assert verify_axes(model, plan, (x,), names=["w"])["w"].status == "ok"
    wrong = nerofy.Plan.from_dict(plan.to_dict())
    wrong.override("w", axis=0)
    assert verify_axes(model, wrong, (x,), names=["w"])["w"].status == "fail"

    model, opt = nerofy.wrap(model, lr=0.02, plan=plan)
    assert model.w.dtype == torch.cfloat
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    mean, dev = _balanced_stats(model.w, e.layout())
    assert mean < 1e-5 and dev < 1e-5
    state = opt.state[model.parametrizations.w.original]
    assert state["v"].dtype == torch.float32 and state["v"].shape == (1, 4, 5, 5)


def test_complex_fused_request_takes_the_reference_path_and_says_so(caplog):
    p = nn.Parameter(torch.randn(3, 6, dtype=torch.complex64))
    opt = Nero([p], lr=0.01, layout=NeuronLayout(axes=(0,)), fused=True)
    p.grad = torch.randn_like(p)
    with caplog.at_level("WARNING", logger="nerofy"):
        opt.step()
    view, dims = NeuronLayout(axes=(0,)).neuron_view(p.detach())
    assert (torch.linalg.vector_norm(view, dim=dims) - 1).abs().max() < 1e-5
    assert torch.isfinite(torch.view_as_real(p.detach())).all()
    from nerofy import _fused

    if _fused.available():  # the kernel is fp32-real only: the warning names the dtype it could not take
        assert any("complex64" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_complex_linear_network_checks_with_the_default_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=torch.cfloat), nn.Linear(16, 4, dtype=torch.cfloat))
    x = torch.randn(6, 8, dtype=torch.cfloat)
    r = check_model(model, (x,), steps=4, plan_inputs=(x,))
    assert r.status == "pass", r.error
    assert r.axes == {"ok": 2, "fail": 0, "unverified": 0}
    assert r.loss[-1] < r.loss[0]  # the default loss is |out|^2: complex outputs count
