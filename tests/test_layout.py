"""NeuronLayout: geometry (neuron views, fan-in, counts), projection, and validation.

The neuron slices are checked against the layers that consume the weights: for every output channel
of the real op, the weights that receive gradient from that channel must be exactly one neuron's
slice under the layout (the "perturb one neuron, only one output changes" check, done with autograd).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from nerofy import NeuronLayout
from nerofy.layout import ELEMENTWISE, ROWS


# Small tensors in long loops: one intra-op thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def neuron_index_sets(layout: NeuronLayout, shape) -> list[frozenset[int]]:
    """The flat element indices owned by each neuron under ``layout`` (via ``neuron_view``)."""
    idx = torch.arange(math.prod(shape)).reshape(shape)
    view, dims = layout.neuron_view(idx)
    keep = [d for d in range(view.dim()) if d not in dims]
    rows = view.permute(*keep, *dims).reshape(-1, math.prod(view.shape[d] for d in dims) if dims else 1)
    return [frozenset(r.tolist()) for r in rows]


def output_channel_supports(op, weight: torch.Tensor, x: torch.Tensor, channel_dim: int = 1) -> list[frozenset[int]]:
    """For each output channel of ``op(x, weight)``, the flat weight indices it depends on."""
    w = weight.detach().clone().requires_grad_(True)
    out = op(x, w)
    supports = []
    for c in range(out.shape[channel_dim]):
        (g,) = torch.autograd.grad(out.select(channel_dim, c).sum(), w, retain_graph=True)
        supports.append(frozenset(torch.nonzero(g.reshape(-1) != 0).flatten().tolist()))
    return supports


def per_neuron_mean_norm(t: torch.Tensor, layout: NeuronLayout):
    view, dims = layout.neuron_view(t.double())
    return view.mean(dim=dims), torch.linalg.vector_norm(view, dim=dims)


# ---------------------------------------------------------------------------------------------
# the neuron slices match the ops that consume the weight
# ---------------------------------------------------------------------------------------------
def _linear(x, w):
    return F.linear(x, w)


def _matmul(x, w):
    return x @ w


CASES = {
    # name: (weight shape, layout, op, input shape)
    "linear (out,in) axis 0": ((5, 7), ROWS, _linear, (3, 7)),
    "x @ W (in,out) last axis": ((7, 5), NeuronLayout(axes=(-1,)), _matmul, (3, 7)),
    "conv2d axis 0": ((6, 4, 3, 3), ROWS, lambda x, w: F.conv2d(x, w), (2, 4, 6, 6)),
    "grouped conv2d axis 0": ((6, 2, 3, 3), ROWS, lambda x, w: F.conv2d(x, w, groups=2), (2, 4, 6, 6)),
    "conv_transpose2d axis 1": ((4, 6, 3, 3), NeuronLayout(axes=(1,)), lambda x, w: F.conv_transpose2d(x, w), (2, 4, 5, 5)),
    "grouped conv_transpose2d g=2": (
        (4, 3, 3, 3), NeuronLayout(axes=(1,), split_axis=0, groups=2),
        lambda x, w: F.conv_transpose2d(x, w, groups=2), (2, 4, 5, 5)),
    "grouped conv_transpose2d g=3 stride 2": (
        (6, 2, 2, 3), NeuronLayout(axes=(1,), split_axis=0, groups=3),
        lambda x, w: F.conv_transpose2d(x, w, groups=3, stride=2), (1, 6, 4, 4)),
    "depthwise conv_transpose1d g=in": (
        (4, 1, 3), NeuronLayout(axes=(1,), split_axis=0, groups=4),
        lambda x, w: F.conv_transpose1d(x, w, groups=4), (2, 4, 7)),
    "grouped conv_transpose3d g=2": (
        (4, 2, 2, 2, 2), NeuronLayout(axes=(1,), split_axis=0, groups=2),
        lambda x, w: F.conv_transpose3d(x, w, groups=2), (1, 4, 3, 3, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_neuron_slices_are_the_fan_in_of_each_output_channel(name):
    shape, layout, op, xshape = CASES[name]
    layout.check(shape)
    w = torch.randn(shape)
    x = torch.rand(xshape) + 0.1  # positive: no accidental zero gradients
    out_channel_dim = x.dim() - 1 if op in (_linear, _matmul) else 1
    supports = output_channel_supports(op, w, x, out_channel_dim)
    neurons = neuron_index_sets(layout, shape)
    # one neuron per output channel, each neuron's slice is exactly one channel's fan-in
    assert len(neurons) == len(supports) == layout.num_neurons(shape)
    assert set(neurons) == set(supports)
    assert all(len(s) == layout.fan_in(shape) for s in supports)


def test_grouped_conv_transpose_without_groups_in_the_layout_is_wrong():
    """Sanity check of the check itself: axis 1 alone mixes groups for a grouped transposed conv."""
    shape, _, op, xshape = CASES["grouped conv_transpose2d g=2"]
    wrong = NeuronLayout(axes=(1,))
    supports = output_channel_supports(op, torch.randn(shape), torch.rand(xshape) + 0.1)
    assert set(neuron_index_sets(wrong, shape)) != set(supports)


def test_grouped_conv_transpose_neuron_order_matches_output_channels():
    """View neuron (group gi, column j) is output channel gi * out_per_group + j."""
    g, in_ch, opg, k = 3, 6, 2, 3
    layout = NeuronLayout(axes=(1,), split_axis=0, groups=g)
    w = torch.randn(in_ch, opg, k, k)
    x = torch.rand(1, in_ch, 4, 4) + 0.1
    supports = output_channel_supports(lambda x, w: F.conv_transpose2d(x, w, groups=g), w, x)
    view, dims = layout.neuron_view(torch.arange(w.numel()).reshape(w.shape))
    assert view.shape == (g, in_ch // g, opg, k, k) and dims == (1, 3, 4)
    for gi in range(g):
        for j in range(opg):
            owned = frozenset(view[gi, :, j].reshape(-1).tolist())
            assert owned == supports[gi * opg + j]


def test_projection_balances_transposed_conv_output_channels():
    """After projecting a grouped ConvTranspose2d weight, each output channel's incoming weights
    (read directly from the (in, out/g, k, k) tensor) are zero-mean and unit-norm."""
    g, in_ch, opg, k = 2, 4, 3, 3
    layout = NeuronLayout(axes=(1,), split_axis=0, groups=g)
    w = layout.project(torch.randn(in_ch, opg, k, k) * 3 + 1)
    ipg = in_ch // g
    for c in range(g * opg):
        gi, j = divmod(c, opg)
        incoming = w[gi * ipg:(gi + 1) * ipg, j]
        assert abs(incoming.mean().item()) < 1e-6
        assert abs(incoming.norm().item() - 1) < 1e-6


# ---------------------------------------------------------------------------------------------
# geometry properties
# ---------------------------------------------------------------------------------------------
@st.composite
def shapes_and_layouts(draw):
    nd = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=nd, max_size=nd)))
    axes = draw(st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True))
    if len(axes) == nd and draw(st.booleans()):
        axes = axes[:-1]  # sometimes leave a fan-in axis, sometimes all-neuron (fan-in 1)
    axes = tuple(a - nd if draw(st.booleans()) else a for a in axes)  # negative axes too
    split_axis, groups = None, 1
    fan_axes = [d for d in range(nd) if d not in {a % nd for a in axes}]
    if fan_axes and draw(st.booleans()):
        sa = draw(st.sampled_from(fan_axes))
        divisors = [d for d in range(2, shape[sa] + 1) if shape[sa] % d == 0]
        if divisors:
            split_axis, groups = sa, draw(st.sampled_from(divisors))
    center = draw(st.booleans())
    normalize = draw(st.booleans())
    layout = NeuronLayout(axes=axes, split_axis=split_axis, groups=groups, center=center, normalize=normalize)
    return shape, layout


@given(shapes_and_layouts())
def test_geometry_is_consistent(sl):
    shape, layout = sl
    layout.check(shape)
    numel = math.prod(shape)
    assert layout.fan_in(shape) * layout.num_neurons(shape) == numel
    t = torch.randn(shape)
    view, dims = layout.neuron_view(t)
    assert math.prod(view.shape[d] for d in dims) == layout.fan_in(shape)
    assert view.numel() == numel
    # the neuron slices partition the tensor
    sets = neuron_index_sets(layout, shape)
    assert len(sets) == layout.num_neurons(shape)
    assert sum(len(s) for s in sets) == numel and frozenset().union(*sets) == frozenset(range(numel))
    # the view shares memory with the tensor: in-place work on it updates the parameter
    view.mul_(0).add_(7.0)
    assert torch.all(t == 7.0)


@given(shapes_and_layouts(), st.sampled_from([torch.float32, torch.float64]))
def test_project_balances_every_neuron_and_is_idempotent(sl, dtype):
    shape, layout = sl
    assume(layout.fan_in(shape) > 1)  # fan-in 1: see test_project_fan_in_1_is_per_neuron
    t = (torch.randn(shape, dtype=dtype) * 5 + 2)
    p = layout.project(t)
    assert p.shape == t.shape and p.dtype == dtype
    assert torch.isfinite(p).all()
    if not layout.constrained:
        assert p is t
        return
    mean, norm = per_neuron_mean_norm(p, layout)
    fan_in = layout.fan_in(shape)
    if layout.center:  # fp32 rounding of the mean scales with the values (centre-only keeps them large)
        assert mean.abs().max() < 1e-6 * max(1.0, t.abs().max().item())
    if layout.normalize:
        assert (norm - 1).abs().max() < 1e-5
    torch.testing.assert_close(layout.project(p), p, rtol=1e-6, atol=1e-6)
    # the input is untouched (out-of-place)
    assert not torch.equal(t, p)


@pytest.mark.parametrize("shape, axes", [((3,), (0,)), ((3, 2), (0, 1))])
def test_project_fan_in_1_is_per_neuron(shape, axes):
    t = torch.randn(shape) * 3 + 1
    lay = NeuronLayout(axes=axes)
    assert lay.fan_in(shape) == 1
    # centring a fan-in-1 neuron leaves exactly zero (never NaN, never a mix of other neurons)
    assert torch.all(lay.project(t) == 0)
    # normalising without centring leaves +-1 per neuron
    torch.testing.assert_close(lay.with_(center=False).project(t), torch.sign(t))


def test_project_fan_in_1_with_a_size_1_fan_in_axis():
    """(n, 1) weights keep a real (size-1) fan-in axis: centring gives 0, normalising gives +-1."""
    t = torch.randn(4, 1) * 3 + 1
    assert torch.all(ROWS.project(t) == 0)
    torch.testing.assert_close(ROWS.with_(center=False).project(t), torch.sign(t))


def test_project_matches_explicit_formula_rows():
    w = torch.randn(4, 9) * 2 + 1
    c = w - w.mean(dim=1, keepdim=True)
    expected = c / c.norm(dim=1, keepdim=True)
    torch.testing.assert_close(ROWS.project(w), expected)
    # center=False: only unit norm; normalize=False: only zero mean
    torch.testing.assert_close(ROWS.with_(center=False).project(w), w / w.norm(dim=1, keepdim=True))
    torch.testing.assert_close(ROWS.with_(normalize=False).project(w), c)


def test_project_last_axis_balances_columns():
    w = torch.randn(9, 4) + 3
    p = NeuronLayout(axes=(-1,)).project(w)
    torch.testing.assert_close(p.mean(dim=0), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.norm(dim=0), torch.ones(4))


def test_project_zero_and_constant_neurons_stay_finite():
    w = torch.randn(4, 6)
    w[1] = 0.0
    w[2] = 3.0  # constant: zero once centred
    p = ROWS.project(w)
    assert torch.isfinite(p).all()
    assert torch.all(p[1] == 0) and torch.all(p[2] == 0)
    torch.testing.assert_close(p[[0, 3]].norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("dtype", [
    torch.float16,
    torch.bfloat16,
])
def test_project_zero_neurons_low_precision_stay_finite(dtype):
    w = torch.randn(4, 6).to(dtype)
    w[1] = 0
    w[2] = 1.5
    p = ROWS.project(w)
    assert torch.isfinite(p).all()
    assert torch.all(p[1] == 0) and torch.all(p[2] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_project_low_precision(dtype):
    w = (torch.randn(8, 32) * 4).to(dtype)
    p = ROWS.project(w)
    assert p.dtype == dtype and torch.isfinite(p).all()
    assert (p.float().norm(dim=1) - 1).abs().max() < 2e-2


# ---------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)])
def test_elementwise_layout(shape):
    lay = NeuronLayout(axes=None)
    assert lay == ELEMENTWISE and lay.elementwise
    assert not lay.center and not lay.normalize and not lay.constrained  # forced off
    assert lay.describe() == "elementwise"
    t = torch.randn(shape)
    view, dims = lay.neuron_view(t)
    assert view is t and dims == ()
    assert lay.fan_in(shape) == 1
    assert lay.num_neurons(shape) == max(1, math.prod(shape))
    assert lay.project(t) is t
    lay.check(shape)  # any shape fits


def test_layout_is_frozen_hashable_and_describes_itself():
    lay = NeuronLayout(axes=[1], split_axis=0, groups=2)
    assert lay.axes == (1,)  # lists become tuples
    assert hash(lay) == hash(NeuronLayout(axes=(1,), split_axis=0, groups=2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.groups = 3
    assert lay.with_(center=False).center is False and lay.center is True
    assert lay.describe() == "axis 1 (+2 groups of axis 0)"
    assert ROWS.describe() == "axis 0"
    assert ROWS.fan_in((6, 4, 3, 3)) == 36 and ROWS.num_neurons((6, 4, 3, 3)) == 6
    assert lay.fan_in((4, 3, 3, 3)) == 18 and lay.num_neurons((4, 3, 3, 3)) == 6


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layout, shape, match",
    [
        (NeuronLayout(axes=(2,)), (3, 4), "out of range"),
        (NeuronLayout(axes=(-3,)), (3, 4), "out of range"),
        (NeuronLayout(axes=(0,)), (), "out of range"),
        (NeuronLayout(axes=(0,), split_axis=5, groups=2), (4, 4), "out of range"),
        (NeuronLayout(axes=(1,), split_axis=1, groups=2), (4, 4), "fan-in axis"),
        (NeuronLayout(axes=(1,), split_axis=-2, groups=2), (4, 4, 3), "fan-in axis"),
        (NeuronLayout(axes=(1,), split_axis=0, groups=3), (4, 2, 3, 3), "groups"),
    ],
)
def test_check_rejects_layouts_that_do_not_fit(layout, shape, match):
    with pytest.raises(ValueError, match=match):
        layout.check(shape)


@pytest.mark.parametrize(
    "layout, shape",
    [
        (ROWS, (3, 4)),
        (NeuronLayout(axes=(-1,)), (3, 4)),
        (NeuronLayout(axes=(1,), split_axis=0, groups=2), (4, 3, 3, 3)),
        (NeuronLayout(axes=(0, 1)), (2, 3, 4)),
        (ELEMENTWISE, (7, 1, 2)),
    ],
)
def test_check_accepts_layouts_that_fit(layout, shape):
    layout.check(shape)


def test_constructor_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups must be >= 1"):
        NeuronLayout(axes=(0,), split_axis=1, groups=0)
    with pytest.raises(ValueError, match="split_axis"):
        NeuronLayout(axes=(1,), groups=2)
