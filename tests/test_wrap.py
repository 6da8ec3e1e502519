"""wrap / bake: the rewrite in place, the matching Nero, and the way back; the whole per-model check
(plan -> verify axes -> wrap -> forward -> backward -> Nero steps -> constraint) on hand-written
models covering every rule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import nerofy
from nerofy.check import check_model, constraint_error
from nerofy.layout import ELEMENTWISE
from nerofy.rewrite import wrapped_plan

from test_plan import Mixed, mixed_inputs
from test_rules import CASES


pytestmark = pytest.mark.usefixtures("single_thread")


class RNNs(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.lstm = nn.LSTM(8, 6, num_layers=2)
        self.gru = nn.GRU(6, 4, bidirectional=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (t, b, 8)
        a, _ = self.mha(x, x, x)
        o, _ = self.lstm(a)
        g, _ = self.gru(o)
        return self.head(g)


def _targets(model):
    """name -> the tensor the optimizer updates (the stored original for balanced weights)."""
    out = {}
    mods = dict(model.named_modules())
    for e in wrapped_plan(model):
        mname, _, attr = e.name.rpartition(".")
        m = mods[mname]
        if parametrize.is_parametrized(m, attr):
            out[e.name] = m.parametrizations[attr].original
        else:
            out[e.name] = m._parameters[attr]
    return out


# ---------------------------------------------------------------------------------------------
# wrap
# ---------------------------------------------------------------------------------------------
def test_wrap_returns_model_and_nero_with_the_plans_layouts():
    model = Mixed()
    plan = nerofy.plan(model, mixed_inputs())
    same, opt = nerofy.wrap(model, lr=0.02, plan=plan)
    assert same is model and isinstance(opt, nerofy.Nero)
    assert wrapped_plan(model) is plan and nerofy.is_wrapped(model)
    targets = _targets(model)
    by_id = {id(t): n for n, t in targets.items()}
    seen = set()
    for g in opt.param_groups:
        assert g["lr"] == 0.02
        for p in g["params"]:
            name = by_id[id(p)]
            seen.add(name)
            assert g["layout"] == plan[name].layout()
            assert g["min_scale"] == (1.0 if plan[name].role == "gain" else 0.0)  # gains step at least lr
    trainable = {e.name for e in plan if e.role != "frozen"}
    assert seen == trainable
    # one group per distinct layout (and least step scale), neuron layouts constrained, the rest elementwise
    layouts = [g["layout"] for g in opt.param_groups]
    assert len(opt.param_groups) == len({(g["layout"], g["min_scale"]) for g in opt.param_groups})
    assert plan["up.weight"].layout() in layouts and ELEMENTWISE in layouts
    for e in plan:
        mname, _, attr = e.name.rpartition(".")
        m = model.get_submodule(mname)
        assert parametrize.is_parametrized(m, attr) == e.constrained, e.name  # neurons and balanced tables


def test_wrap_with_example_inputs_and_options():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model, opt = nerofy.wrap(model, lr=0.05, example_inputs=(torch.randn(2, 4),), beta=0.99)
    assert wrapped_plan(model).frontend == "fx"
    assert all(g["beta"] == 0.99 and g["lr"] == 0.05 for g in opt.param_groups)


def test_wrapping_twice_is_an_error():
    model = Mixed()
    nerofy.wrap(model, example_inputs=mixed_inputs())
    with pytest.raises(ValueError, match="already wrapped"):
        nerofy.wrap(model, example_inputs=mixed_inputs())
    # also when the plan marker is gone but the parametrizations are there
    object.__delattr__(model, "_nerofy_plan")
    with pytest.raises(ValueError, match="already wrapped"):
        nerofy.wrap(model)


def test_outputs_keep_shapes_and_constraint_holds():
    model = Mixed()
    inputs = mixed_inputs()
    with torch.no_grad():
        before = model(*inputs)
    model, _ = nerofy.wrap(model, example_inputs=inputs)
    after = model(*inputs)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert constraint_error(model, wrapped_plan(model)) < 1e-5
    w = model.up.weight                       # grouped transposed conv: per (group, out channel)
    v = w.unflatten(0, (2, 4))                 # (g, in/g, out/g, k, k)
    assert torch.allclose(v.mean(dim=(1, 3, 4)), torch.zeros(2, 2), atol=1e-6)
    gain = model.up.parametrizations.weight[0].scale  # relu feeds it: its signal gain
    assert gain == pytest.approx(math.sqrt(2), rel=1e-5)
    assert torch.allclose(torch.linalg.vector_norm(v, dim=(1, 3, 4)), torch.full((2, 2), gain), atol=1e-5)
    assert torch.allclose(model.proj.norm(dim=0), torch.ones(6), atol=1e-5)   # (in, out): columns


def test_frozen_parameters_untouched_and_not_in_the_optimizer():
    model = Mixed()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model, opt = nerofy.wrap(model, example_inputs=mixed_inputs())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    for n in frozen:
        p = model.get_parameter(n)
        assert id(p) not in ids
        assert not parametrize.is_parametrized(model.get_submodule(n.rpartition(".")[0]))
    for _ in range(3):
        opt.zero_grad()
        model(*mixed_inputs()).square().mean().backward()
        opt.step()
    for n, v in frozen.items():
        assert torch.equal(model.get_parameter(n), v) and model.get_parameter(n).grad is None


def test_tied_weights_wrap_once_and_stay_tied():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t):
            return self.head(torch.tanh(self.mid(self.emb(t))))

    model = M()
    t = torch.randint(0, 10, (2, 5))
    model, opt = nerofy.wrap(model, example_inputs=(t,))
    assert model.emb.parametrizations.weight.original is model.head.parametrizations.weight.original
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len(wrapped_plan(model)) == 3   # emb/head weight once, mid.weight, mid.bias
    for _ in range(2):
        opt.zero_grad()
        model(t).square().mean().backward()
        opt.step()
    assert torch.equal(model.emb.weight, model.head.weight)
    assert constraint_error(model, wrapped_plan(model)) < 1e-5


def test_override_to_free_leaves_the_weight_plain():
    model = Mixed()
    plan = nerofy.plan(model, mixed_inputs())
    plan.override("conv.weight", role="free")
    model, opt = nerofy.wrap(model, plan=plan)
    assert not parametrize.is_parametrized(model.conv)
    assert any(model.conv.weight is p for g in opt.param_groups if g["layout"] == ELEMENTWISE for p in g["params"])


def test_wrap_errors():
    with pytest.raises(ValueError, match="needs a torch.nn.Module"):
        nerofy.wrap("resnet50")
    with pytest.raises(ValueError, match="no trainable parameters"):
        nerofy.wrap(nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ValueError, match="do not fit"):
        nerofy.wrap(nn.Linear(2, 2), example_inputs=(torch.randn(3, 5),))


# ---------------------------------------------------------------------------------------------
# bake and checkpoints
# ---------------------------------------------------------------------------------------------
def _train(model, opt, inputs, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        model(*inputs).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("tied", [False, True])
def test_bake_gives_identical_outputs_and_plain_keys(tied):
    model = Mixed(tied=tied)
    keys = list(model.state_dict().keys())
    inputs = mixed_inputs()
    model, opt = nerofy.wrap(model, example_inputs=inputs)
    _train(model, opt, inputs)
    model.eval()
    with torch.no_grad():
        y = model(*inputs)
    baked = nerofy.bake(model)
    assert baked is model and not nerofy.is_wrapped(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert sorted(model.state_dict().keys()) == sorted(keys)
    with torch.no_grad():
        if tied:   # see test_bake_tied_weights_bitwise
            assert torch.allclose(model(*inputs), y, rtol=0, atol=1e-6)
            assert model.emb.weight is model.head.weight
        else:
            assert torch.equal(model(*inputs), y)
    # a baked model can be wrapped again
    nerofy.wrap(model, example_inputs=inputs)


def test_bake_tied_weights_bitwise():
    model, inputs = Mixed(tied=True), mixed_inputs()
    nerofy.wrap(model, example_inputs=inputs)
    model.eval()
    with torch.no_grad():
        w = model.emb.weight.clone()
    nerofy.bake(model)
    assert torch.equal(model.emb.weight, w)


def test_bake_keeps_parameter_order():
    model = Mixed()
    keys = list(model.state_dict().keys())
    nerofy.wrap(model, example_inputs=mixed_inputs())
    nerofy.bake(model)
    assert list(model.state_dict().keys()) == keys


def test_plain_state_dict_loads_into_a_wrapped_model_projected():
    src = Mixed()
    plain = {k: v.clone() for k, v in src.state_dict().items()}
    model = Mixed()
    model, _ = nerofy.wrap(model, example_inputs=mixed_inputs())
    model.load_state_dict(plain, strict=False)
    plan = wrapped_plan(model)
    for e in plan:
        mod, attr = model.get_submodule(e.name.rpartition(".")[0]), e.name.rpartition(".")[2]
        if e.constrained and not plain[e.name].any():
            continue  # all zero (the position table): no direction to project, it gets a random one
        got = getattr(mod, attr) if e.constrained else model.get_parameter(e.name)
        want = e.layout().project(plain[e.name]) * mod.parametrizations[attr][0].scale if e.constrained \
            else plain[e.name]
        assert torch.allclose(got, want, atol=1e-6), e.name
    assert constraint_error(model, plan) < 1e-5


def test_plain_state_dict_loads_strictly():
    plain = Mixed().state_dict()
    model, _ = nerofy.wrap(Mixed(), example_inputs=mixed_inputs())
    model.load_state_dict(plain)


def test_wrapped_state_dict_round_trip():
    inputs = mixed_inputs()
    a, opt = nerofy.wrap(Mixed(), example_inputs=inputs)
    _train(a, opt, inputs, 1)
    b, _ = nerofy.wrap(Mixed(), example_inputs=inputs)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(*inputs), b(*inputs))


# ---------------------------------------------------------------------------------------------
# the whole check on hand-written models covering every rule
# ---------------------------------------------------------------------------------------------
def _cases():
    out = [pytest.param(CASES[c][0], CASES[c][1], id=c) for c in CASES]
    out.append(pytest.param(Mixed, mixed_inputs, id="mixed"))
    out.append(pytest.param(RNNs, lambda: (torch.randn(4, 2, 8),), id="mha_lstm_gru"))
    return out


@pytest.mark.parametrize("cls, make_inputs", _cases())
def test_check_model_passes(cls, make_inputs):
    model, inputs = cls(), make_inputs()
    r = check_model(model, inputs, plan_inputs=inputs, steps=2)
    assert r.status == "pass", (r.status, r.error)
    assert r.axes.get("fail", 0) == 0 and not r.axis_failures
    assert r.max_constraint_error < 1e-4
    assert all(torch.isfinite(torch.tensor(r.loss)))
    assert sum(r.tensors_by_role.values()) == len(list(model.named_parameters()))
    assert r.tensors_by_role["free"] == 0


def test_rnn_weights_constrained_per_gate_row():
    model = RNNs()
    x = torch.randn(4, 2, 8)
    model, opt = nerofy.wrap(model, example_inputs=(x,))
    for name in ("weight_ih_l0", "weight_hh_l1"):
        w = getattr(model.lstm, name)
        assert torch.allclose(w.norm(dim=1), torch.ones(w.shape[0]), atol=1e-5)
        assert torch.allclose(w.mean(dim=1), torch.zeros(w.shape[0]), atol=1e-6)
    _train(model, opt, (x,), 2)
    assert constraint_error(model, wrapped_plan(model)) < 1e-5
    assert torch.isfinite(model(x)).all()


def test_zero_initialised_weights_are_never_nan_or_dead():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    nn.init.zeros_(model[2].weight)
    x = torch.randn(5, 4)
    model, opt = nerofy.wrap(model, example_inputs=(x,))
    w = model[2].weight
    gain = model[2].parametrizations.weight[0].scale
    assert torch.isfinite(w).all() and torch.allclose(w.norm(dim=1), torch.full((3,), gain), atol=1e-5)
    _train(model, opt, (x,), 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_functional_conv_with_raw_parameter_stays_balanced_after_steps():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 2, 2))   # conv_transpose2d groups=1: (in, out, k, k)

        def forward(self, x):
            return F.conv_transpose2d(x, self.w)

    model, x = M(), torch.randn(2, 4, 3, 3)
    model, opt = nerofy.wrap(model, example_inputs=(x,))
    _train(model, opt, (x,), 3)
    assert torch.allclose(torch.linalg.vector_norm(model.w, dim=(0, 2, 3)), torch.ones(3), atol=1e-5)
    assert torch.allclose(model.w.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-6)
