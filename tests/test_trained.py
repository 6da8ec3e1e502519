"""Wrapping trained weights (issue 17): keep="function", per-neuron gains, stale BatchNorm statistics."""
import copy
import logging

import pytest
import torch
from torch import nn

import nerofy
from nerofy.balanced import Balanced
from nerofy.check import check_model, constraint_error
from nerofy.layout import NeuronLayout
from nerofy.rewrite import wrapped_plan


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 8, seed: int = 0) -> nn.Module:
    """``model`` after a few AdamW steps on a fixed target: weights with non-zero neuron means and
    uneven norms, BatchNorm statistics tracked (as a trained checkpoint has them)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    target = torch.randn_like(model(x))
    for _ in range(steps):
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class ConvNet(nn.Module):
    """Every layout kind nerofy makes: rows, grouped conv, ConvTranspose (in, out) columns, grouped
    transposed conv (split axis), a linear head; BatchNorm with tracked statistics."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.upg = nn.ConvTranspose2d(6, 4, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.up(x))
        x = torch.relu(self.bn2(self.upg(x)))
        return self.head(x.mean((2, 3)))


def _x():
    return torch.randn(6, 2, 7, 7, generator=torch.Generator().manual_seed(3))


def test_keep_function_reproduces_the_trained_outputs_for_every_layout():
    x = _x()
    trained = _trained(ConvNet().train(), x)
    ref = trained(x)
    model, opt = nerofy.wrap(copy.deepcopy(trained), example_inputs=(x,), keep="function")
    out = model.eval()(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    plan = wrapped_plan(model)
    kinds = {plan[n].layout().describe() for n in ("c2.weight", "up.weight", "upg.weight")}
    assert len(kinds) == 3  # grouped rows, (in, out) columns, split-axis groups all covered
    for e in plan:
        if e.role == "neuron":
            assert e.kept and not e.center and "trained norm" in e.reason
    assert "trained" in plan.table()
    # the default wrap of the same weights changes the function (what keep="function" is for)
    plain, _ = nerofy.wrap(copy.deepcopy(trained), example_inputs=(x,))
    assert (plain.eval()(x) - ref).abs().max() > 0.1 * ref.abs().max()


def test_keep_function_trains_on_each_neurons_sphere_of_its_trained_radius():
    x = _x()
    trained = _trained(ConvNet().train(), x)
    norms = {n: torch.linalg.vector_norm(p.detach().flatten(1), dim=1) for n, p in trained.named_parameters()
             if n == "c1.weight"}
    model, opt = nerofy.wrap(copy.deepcopy(trained), example_inputs=(x,), keep="function")
    model.train()
    w0 = model.c1.weight.detach().clone()
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = model.c1.weight.detach()
    assert not torch.allclose(w, w0)  # it moved
    assert torch.allclose(torch.linalg.vector_norm(w.flatten(1), dim=1), norms["c1.weight"], rtol=1e-5)
    assert constraint_error(model, wrapped_plan(model)) < 1e-5


def test_centred_trained_neurons_stay_centred_and_zero_tensors_become_free():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():  # layer 0: centred rows of uneven norms; head: all zero (a zero-init head)
        w = m[0].weight
        w.sub_(w.mean(1, keepdim=True)).mul_(torch.linspace(0.5, 3.0, 8)[:, None])
        m[2].weight.zero_()
        m[2].bias.uniform_(-1, 1)
    x = torch.randn(5, 6)
    ref = m(x)
    model, opt = nerofy.wrap(copy.deepcopy(m), example_inputs=(x,), keep="function")
    plan = wrapped_plan(model)
    assert plan["0.weight"].center and plan["0.weight"].kept  # its means were rounding: centring kept
    assert plan["2.weight"].role == "free" and not plan["2.weight"].constrained
    assert any("all-zero tensors are left unconstrained" in w for w in plan.warnings)
    assert torch.allclose(model(x), ref, atol=1e-6)
    loss = model(x).square().mean() + model(x)[:, 0].sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert model[2].weight.abs().sum() > 0  # the zero head moves from zero


def test_zero_neurons_keep_gain_zero_without_nan():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        m[0].weight[2].zero_()
    x = torch.randn(4, 6)
    ref = m(x)
    model, opt = nerofy.wrap(copy.deepcopy(m), example_inputs=(x,), keep="function")
    assert torch.allclose(model(x), ref, atol=1e-6)
    assert any("1 neurons are zero" in w for w in wrapped_plan(model).warnings)
    for _ in range(2):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(model[0].weight[2].detach().abs().max()) == 0.0


def test_keep_function_checkpoints_exports_and_plain_loads_round_trip():
    x = _x()
    trained = _trained(ConvNet().train(), x)
    ref = trained(x)
    a, opt = nerofy.wrap(copy.deepcopy(trained), example_inputs=(x,), keep="function")
    a.train()
    loss = a(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    a.eval()
    sd = a.state_dict()
    gain = sd["c1.parametrizations.weight.0._extra_state"]
    assert gain.dtype == torch.float64 and gain.shape == (8, 1, 1, 1)
    b, _ = nerofy.wrap(copy.deepcopy(trained), example_inputs=(x,), keep="function")
    b.load_state_dict(sd)
    assert torch.equal(b.eval()(x), a(x))
    # the plain export loads into the plain architecture, and back into a keep="function" wrap exactly
    plain = nerofy.export_state_dict(a)
    p = copy.deepcopy(trained)
    p.load_state_dict(plain)
    assert torch.allclose(p(x), a(x), atol=1e-5)
    c, _ = nerofy.wrap(copy.deepcopy(trained), example_inputs=(x,), keep="function")
    c.load_state_dict(plain)
    assert torch.allclose(c.eval()(x), a(x), atol=1e-5)
    # and the trained plain checkpoint itself into a keep="function" wrap: its function
    c.load_state_dict(trained.state_dict())
    assert (c(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    nerofy.bake(a)
    assert torch.allclose(a(x), p(x), atol=1e-5)  # baked: a plain module with the same outputs


def test_cli_plain_keys_fold_per_neuron_gains():
    from nerofy_cli.models import plain_keys

    x = _x()
    trained = _trained(ConvNet().train(), x)
    a, _ = nerofy.wrap(copy.deepcopy(trained), example_inputs=(x,), keep="function")
    sd, renamed = plain_keys(a.state_dict())
    assert renamed >= 5
    for name in ("c1.weight", "c2.weight", "up.weight", "head.weight"):
        assert torch.allclose(sd[name], trained.state_dict()[name], atol=1e-6), name


def test_per_neuron_gain_parametrization_gradient():
    lay = NeuronLayout((0,), center=False)
    g = torch.tensor([[0.5], [2.0], [0.0]], dtype=torch.float64)
    b = Balanced(lay, g)
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(b, (v,))
    w = b(v)
    assert torch.allclose(torch.linalg.vector_norm(w, dim=1), g.flatten())
    assert "per-neuron (3)" in repr(b)
    with pytest.raises(ValueError, match="floating-point"):
        Balanced(lay, torch.ones(3, 1, dtype=torch.long))


def test_keep_errors():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="unknown keep mode 'weights'"):
        nerofy.wrap(copy.deepcopy(m), example_inputs=(x,), keep="weights")
    with pytest.raises(ValueError, match="scale='unit' does not apply"):
        nerofy.wrap(copy.deepcopy(m), example_inputs=(x,), keep="function", scale="unit")
    meta = copy.deepcopy(m).to("meta")
    with pytest.raises(ValueError, match="meta device"):
        nerofy.wrap(meta, plan=nerofy.plan(m, (x,)), keep="function")


def test_override_gain_replaces_the_trained_norms_and_json_keeps_kept():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    model, _ = nerofy.wrap(m, example_inputs=(x,), keep="function")
    plan = wrapped_plan(model)
    again = nerofy.Plan.from_dict(plan.to_dict())
    assert again["0.weight"].kept
    again.override("0.weight", gain=2.0)
    assert not again["0.weight"].kept and again["0.weight"].signal_gain() == 2.0


def test_check_model_reports_the_output_change_at_wrap():
    x = _x()
    trained = _trained(ConvNet().train(), x)
    r = check_model(copy.deepcopy(trained), (x,), keep="function")
    assert r.status == "pass" and r.wrap_output_change is not None and r.wrap_output_change < 1e-5
    assert r.max_constraint_error < 1e-5
    assert any("keep='function'" in w for w in r.warnings)


def test_stale_batchnorm_statistics_are_named_and_reestimated(caplog):
    x = _x()
    trained = _trained(ConvNet().train(), x)
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        model, _ = nerofy.wrap(copy.deepcopy(trained), example_inputs=(x,))
    assert any("hold running statistics from training" in r.getMessage() and "reestimate_bn" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nerofy"):  # a fresh model: nothing is stale
        nerofy.wrap(ConvNet(), example_inputs=(x,))
        nerofy.wrap(copy.deepcopy(trained), example_inputs=(x,), keep="function")
    assert not any("running statistics" in r.getMessage() for r in caplog.records)

    batches = [x[:3], x[3:]]
    model.eval()
    model.bn1.momentum = 0.3
    n = nerofy.reestimate_bn(model, batches)
    assert n == 2 and not model.training and model.bn1.momentum == 0.3
    # the cumulative average of the per-batch statistics of what bn1 sees now
    with torch.no_grad():
        feats = [model.c1(b) for b in batches]
    want = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(model.bn1.running_mean, want, atol=1e-5)
    with pytest.raises(ValueError, match="no BatchNorm"):
        nerofy.reestimate_bn(nn.Linear(2, 2), [torch.randn(1, 2)])
    with pytest.raises(ValueError, match="no batches"):
        nerofy.reestimate_bn(model, [])
