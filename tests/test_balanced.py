"""The balanced parametrization (nerofy.balanced): registration, the forward weight, right_inverse,
dead neurons, fan-in 1, stacking, the meta device, and training with Nero."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from nerofy import Balanced, Nero, NeuronLayout, balance, is_balanced
from nerofy.balanced import fill_dead_
from nerofy.layout import ELEMENTWISE, ROWS

GROUPED_T = NeuronLayout(axes=(1,), split_axis=0, groups=2)


def mean_norm(t, layout):
    view, dims = layout.neuron_view(t.detach().double())
    return view.mean(dim=dims), torch.linalg.vector_norm(view, dim=dims)


def assert_balanced(t, layout, tol=1e-5, center=True):
    assert torch.isfinite(t).all()
    mean, norm = mean_norm(t, layout)
    if center and layout.center:
        assert mean.abs().max().item() < tol
    assert (norm - 1).abs().max().item() < tol


def angles(a, b, layout):
    va, dims = layout.neuron_view(a.detach().double())
    vb, _ = layout.neuron_view(b.detach().double())
    ua = va / torch.linalg.vector_norm(va, dim=dims, keepdim=True)
    ub = vb / torch.linalg.vector_norm(vb, dim=dims, keepdim=True)
    return 2 * torch.asin(torch.linalg.vector_norm(ua - ub, dim=dims) / 2)


# Small tensors in long loops: one intra-op thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------
# registration and the forward weight
# ---------------------------------------------------------------------------------------------
MODULES = {
    "linear": (lambda: nn.Linear(7, 5), ROWS, (3, 7), lambda m, x, w: F.linear(x, w, m.bias)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3), ROWS, (2, 4, 6, 6), lambda m, x, w: F.conv2d(x, w, m.bias)),
    "grouped conv2d": (lambda: nn.Conv2d(4, 6, 3, groups=2), ROWS, (2, 4, 6, 6),
                       lambda m, x, w: F.conv2d(x, w, m.bias, groups=2)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3), NeuronLayout(axes=(1,)), (2, 4, 5, 5),
                         lambda m, x, w: F.conv_transpose2d(x, w, m.bias)),
    "grouped conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), GROUPED_T, (2, 4, 5, 5),
                                 lambda m, x, w: F.conv_transpose2d(x, w, m.bias, groups=2)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_register_and_forward_weight_is_balanced(name):
    make, layout, xshape, op = MODULES[name]
    m = make()
    w_plain = m.weight.detach().clone()
    b = balance(m, "weight", layout)
    assert isinstance(b, Balanced) and b.layout == layout
    assert is_balanced(m) and is_balanced(m, "weight") and not is_balanced(m, "bias")
    assert parametrize.is_parametrized(m, "weight")
    orig = m.parametrizations.weight.original
    assert isinstance(orig, nn.Parameter) and orig.shape == w_plain.shape
    # registration projects the initial weights (right_inverse)
    torch.testing.assert_close(orig.detach(), layout.project(w_plain))
    # the forward weight is balanced per output channel, and the module uses it
    assert_balanced(m.weight, layout)
    x = torch.randn(xshape)
    torch.testing.assert_close(m(x), op(m, x, layout.project(orig.detach())))
    keys = set(m.state_dict())
    assert "parametrizations.weight.original" in keys and "weight" not in keys and "bias" in keys
    assert layout.describe() in repr(m)


def test_output_channels_of_balanced_grouped_conv_transpose_are_balanced():
    """Read each output channel's incoming weights straight from the (in, out/g, k, k) tensor."""
    m = nn.ConvTranspose2d(6, 4, 3, groups=2)
    balance(m, "weight", GROUPED_T)
    w = m.weight.detach()
    ipg, opg = 3, 2
    for c in range(4):
        gi, j = divmod(c, opg)
        incoming = w[gi * ipg:(gi + 1) * ipg, j]
        assert abs(incoming.mean().item()) < 1e-6 and abs(incoming.norm().item() - 1) < 1e-6


@given(
    rows=st.integers(1, 6), fan_in=st.integers(2, 12), scale=st.sampled_from([1e-20, 1e-6, 1.0, 1e6]),
    offset=st.sampled_from([0.0, 1.0, -50.0]), seed=st.integers(0, 2**16),
)
def test_forward_weight_is_balanced_for_any_assigned_weights(rows, fan_in, scale, offset, seed):
    """right_inverse projects whatever is assigned; the forward weight is always balanced."""
    gen = torch.Generator().manual_seed(seed)
    m = nn.Linear(fan_in, rows)
    balance(m, "weight", ROWS)
    w = torch.randn(rows, fan_in, generator=gen) * scale + offset
    m.weight = w
    orig = m.parametrizations.weight.original.detach()
    assert torch.isfinite(orig).all()
    assert_balanced(m.weight, ROWS, 1e-5)
    # where the assigned rows had a direction, the stored tensor is their projection
    c = w.double() - w.double().mean(dim=1, keepdim=True)
    ok = c.norm(dim=1) > 1e-6 * (w.double().abs().amax(dim=1) + 1e-30)
    ok &= c.norm(dim=1) > 1e-11  # above nerofy.balanced.DEAD_NORM (1e-12): a neuron with a direction
    if ok.any():
        expected = c[ok] / c[ok].norm(dim=1, keepdim=True)
        torch.testing.assert_close(m.weight.detach()[ok].double(), expected, rtol=1e-3, atol=1e-3)


def test_right_inverse_projects_assigned_weights_and_keeps_balanced_ones():
    m = nn.Linear(8, 4)
    balance(m, "weight", ROWS)
    w = torch.randn(4, 8) * 5 + 2
    m.weight = w
    torch.testing.assert_close(m.parametrizations.weight.original.detach(), ROWS.project(w))
    torch.testing.assert_close(m.weight.detach(), ROWS.project(w))
    # assigning a balanced weight keeps it (and the layer's function) exactly
    wb = ROWS.project(torch.randn(4, 8))
    m.weight = wb
    torch.testing.assert_close(m.weight.detach(), wb, rtol=1e-6, atol=1e-7)


def test_scale_and_uncentred_layouts():
    m = nn.Linear(8, 4)
    balance(m, "weight", ROWS, scale=2.5)
    torch.testing.assert_close(m.weight.norm(dim=1), torch.full((4,), 2.5))
    m2 = nn.Linear(8, 4)
    with torch.no_grad():
        m2.weight.add_(1.0)
    balance(m2, "weight", ROWS.with_(center=False))
    torch.testing.assert_close(m2.weight.norm(dim=1), torch.ones(4))
    assert (m2.weight.mean(dim=1).abs() > 0.05).all()  # not centred


def test_gradient_through_the_parametrization_is_tangent():
    """With a balanced stored tensor, autograd's gradient w.r.t. it is zero-mean and orthogonal to
    every neuron: the projected gradient (what Nero's lr-as-angle relies on)."""
    m = nn.Linear(10, 6)
    balance(m, "weight", ROWS)
    x = torch.randn(32, 10)
    m(x).pow(3).sum().backward()
    v = m.parametrizations.weight.original
    g = v.grad
    assert g.abs().max() > 1e-3
    tol = 1e-6 * g.abs().max().item()  # fp32 rounding, relative to the gradient's size
    torch.testing.assert_close(g.mean(dim=1), torch.zeros(6), atol=tol, rtol=0)
    torch.testing.assert_close((g * v.detach()).sum(dim=1), torch.zeros(6), atol=10 * tol, rtol=0)


# ---------------------------------------------------------------------------------------------
# dead neurons, fan-in 1, stacking, bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
def test_all_zero_init_rows_get_a_direction(name):
    make, layout, xshape, _ = MODULES[name]
    m = make()
    with torch.no_grad():
        m.weight.zero_()
    balance(m, "weight", layout)
    w = m.weight.detach()
    assert torch.isfinite(w).all()
    _, norm = mean_norm(w, layout)
    assert (norm > 0.5).all()
    assert_balanced(w, layout)
    assert torch.isfinite(m(torch.randn(xshape))).all()


def test_dead_rows_only_are_filled_deterministically():
    def make():
        torch.manual_seed(5)
        m = nn.Linear(6, 5)
        with torch.no_grad():
            m.weight[1] = 0.0
            m.weight[3] = -4.0  # constant: no direction once centred
        return m

    a, b = make(), make()
    live = ROWS.project(a.weight.detach())[[0, 2, 4]]
    balance(a, "weight", ROWS)
    torch.manual_seed(123)  # the fill uses its own fixed generator, not the global RNG
    balance(b, "weight", ROWS)
    assert torch.equal(a.weight, b.weight)
    torch.testing.assert_close(a.weight.detach()[[0, 2, 4]], live)
    assert_balanced(a.weight, ROWS)
    assert not torch.allclose(a.weight[1], a.weight[3])  # two dead rows, two different directions
    # assigning zeros later is handled the same way
    a.weight = torch.zeros(5, 6)
    assert_balanced(a.weight, ROWS)


def test_fill_dead_counts_and_leaves_live_neurons_alone():
    t = torch.randn(4, 6)
    t[2] = 0.0
    live = t[[0, 1, 3]].clone()
    assert fill_dead_(t, ROWS) == 1
    assert torch.equal(t[[0, 1, 3]], live)
    assert torch.isfinite(t).all() and t[2].norm() > 0.5
    assert fill_dead_(t, ROWS) == 0
    assert fill_dead_(torch.zeros(3, 4, device="meta"), ROWS) == 0
    assert fill_dead_(torch.zeros(3, 4), ELEMENTWISE) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_and_dead_rows(dtype):
    m = nn.Linear(16, 4).to(dtype)
    with torch.no_grad():
        m.weight[0] = 0
    balance(m, "weight", ROWS)
    assert m.weight.dtype == dtype
    assert_balanced(m.weight.float(), ROWS, 3e-2)


@pytest.mark.parametrize(
    "make, layout",
    [
        (lambda: nn.Linear(1, 4), ROWS),
        (lambda: nn.Conv2d(5, 5, 1, groups=5), ROWS),                     # 1x1 depthwise
        (lambda: nn.ConvTranspose2d(4, 4, 1, groups=4), GROUPED_T.with_(groups=4)),
        (lambda: nn.Linear(5, 3), NeuronLayout(axes=(0, 1))),
    ],
)
def test_fan_in_1_is_a_clear_value_error(make, layout):
    m = make()
    with pytest.raises(ValueError, match="fan-in 1"):
        balance(m, "weight", layout)
    assert not parametrize.is_parametrized(m)


def test_stacking_twice_is_a_value_error():
    m = nn.Linear(6, 4)
    balance(m, "weight", ROWS)
    w = m.weight.detach().clone()
    with pytest.raises(ValueError, match="already parametrized"):
        balance(m, "weight", ROWS)
    with pytest.raises(ValueError, match="already parametrized"):
        balance(m, "weight", ROWS.with_(center=False))
    assert len(m.parametrizations.weight) == 1
    assert torch.equal(m.weight, w)


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError):
        Balanced(ELEMENTWISE)
    with pytest.raises(ValueError):
        Balanced(ROWS.with_(center=False, normalize=False))
    with pytest.raises(ValueError):
        balance(torch.randn(3, 4), "weight", ROWS)
    with pytest.raises(ValueError):
        balance(nn.Linear(3, 4), "nope", ROWS)
    with pytest.raises(ValueError):
        balance(nn.Linear(3, 4), "weight", NeuronLayout(axes=(2,)))
    with pytest.raises(ValueError):
        balance(nn.ConvTranspose2d(3, 4, 3), "weight", NeuronLayout(axes=(1,), split_axis=0, groups=2))


# ---------------------------------------------------------------------------------------------
# the meta device, checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
def test_works_on_the_meta_device(name):
    make, layout, xshape, _ = MODULES[name]
    with torch.device("meta"):
        m = make()
    balance(m, "weight", layout)
    assert is_balanced(m, "weight")
    assert m.weight.is_meta and m.parametrizations.weight.original.is_meta
    out = m(torch.empty(xshape, device="meta"))
    assert out.is_meta
    with torch.device("cpu"):
        real = make()
    assert out.shape == real(torch.randn(xshape)).shape


@pytest.mark.parametrize("name", ["linear", "grouped conv_transpose2d"])
def test_meta_then_to_empty_then_load_weights_is_balanced(name):
    make, layout, xshape, _ = MODULES[name]
    with torch.device("meta"):
        m = make()
    balance(m, "weight", layout)
    # deterministic mode fills uninitialised memory with NaN, so the outcome does not depend on
    # whatever the allocator hands back
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        m.to_empty(device="cpu")
    finally:
        torch.use_deterministic_algorithms(was)
    real = make()
    m.weight = real.weight.detach()
    with torch.no_grad():
        m.bias.copy_(real.bias)
    assert_balanced(m.weight, layout)
    assert torch.isfinite(m(torch.randn(xshape))).all()


def test_state_dict_round_trip_and_bake():
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    balance(a, "weight", ROWS)
    balance(b, "weight", ROWS)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(a(x), b(x))
    y = a(x).detach()
    parametrize.remove_parametrizations(a, "weight", leave_parametrized=True)
    assert not is_balanced(a) and set(a.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(a(x), y)
    assert_balanced(a.weight, ROWS)


# ---------------------------------------------------------------------------------------------
# training with Nero
# ---------------------------------------------------------------------------------------------
def _balanced_mlp():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    for layer in model:
        if isinstance(layer, nn.Linear):
            balance(layer, "weight", ROWS)
    return model


def test_training_with_parametrization_and_nero_lowers_the_loss_and_turns_by_lr():
    """Minibatch training (stationary gradient noise): the loss goes down, the stored tensors and the
    forward weights stay balanced, and each neuron turns by ~lr per step."""
    torch.manual_seed(12)
    x = torch.randn(1024, 8)
    y = torch.sin(x @ torch.randn(8, 3)) + 0.1 * torch.randn(1024, 3)
    model = _balanced_mlp()
    lr, beta, steps = 0.02, 0.999, 200
    opt = Nero(model.parameters(), lr=lr)
    originals = [m.parametrizations.weight.original for m in model if isinstance(m, nn.Linear)]
    first = F.mse_loss(model(x), y).item()
    gen = torch.Generator().manual_seed(0)
    measured = []
    for t in range(steps):
        idx = torch.randint(0, 1024, (16,), generator=gen)
        before = [o.detach().clone() for o in originals]
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
        if t >= steps // 2:
            measured.append(torch.cat([angles(b, o, ROWS) for b, o in zip(before, originals)]))
    with torch.no_grad():
        last = F.mse_loss(model(x), y).item()
    assert last < 0.8 * first
    for o in originals:  # the stored tensors stay on the balanced set, so lr stays an angle
        assert_balanced(o, ROWS)
    for m in model:
        if isinstance(m, nn.Linear):
            assert_balanced(m.weight, ROWS)
    a = torch.stack(measured)  # (steps, neurons)
    # each neuron turns by ~lr per step on average ...
    assert 0.6 * lr < a.median() < 1.05 * lr
    per_neuron = a.mean(dim=0)
    assert (0.4 * lr < per_neuron).all() and (per_neuron < 1.5 * lr).all()
    # ... and never by more than the hard bound |g_t| / sqrt(v_hat_t) <= sqrt((1 - beta^t) / (1 - beta))
    assert a.max() <= math.atan(lr * math.sqrt((1 - beta ** steps) / (1 - beta))) + 1e-9


def test_nero_state_and_resume_on_a_balanced_model():
    torch.manual_seed(13)
    x, y = torch.randn(64, 8), torch.randn(64, 3)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    a = _balanced_mlp()
    opt_a = Nero(a.parameters())
    train(a, opt_a, 10)
    sd_m, sd_o = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    train(a, opt_a, 5)
    b = _balanced_mlp()
    opt_b = Nero(b.parameters())
    b.load_state_dict(sd_m)
    opt_b.load_state_dict(sd_o)
    train(b, opt_b, 5)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), k
    # one fp32 value per neuron for the stored weights, one per element for the biases
    for m in a:
        if isinstance(m, nn.Linear):
            assert opt_a.state[m.parametrizations.weight.original]["v"].numel() == m.out_features
            assert opt_a.state[m.bias]["v"].numel() == m.out_features
