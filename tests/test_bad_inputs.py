"""Bad inputs (issue item 6): each gives one clear error or a documented behaviour
(docs/ecosystem.md "Bad inputs"). The zoo's hang/OOM isolation is tested with the zoo (tests/test_zoo.py).
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy
from nerofy.check import constraint_error
from nerofy.rewrite import wrapped_plan


pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _step(m, opt, x=None):
    x = torch.randn(4, 6) if x is None else x
    opt.zero_grad(set_to_none=True)
    m(x).square().mean().backward()
    opt.step()


# ---- wrapping twice -------------------------------------------------------------------------
def test_wrapping_twice_is_one_clear_error():
    m, _ = nerofy.wrap(Net())
    with pytest.raises(ValueError, match="already wrapped.*bake"):
        nerofy.wrap(m)
    # a submodule of a wrapped model is wrapped too
    with pytest.raises(ValueError, match="already wrapped"):
        nerofy.wrap(m.fc1)


# ---- frozen / unfrozen ----------------------------------------------------------------------
def test_frozen_parameters_stay_plain_and_out_of_the_optimizer():
    m = Net()
    m.fc1.requires_grad_(False)
    before = m.fc1.weight.detach().clone()
    m, opt = nerofy.wrap(m)
    assert wrapped_plan(m)["fc1.weight"].role == "frozen"
    assert not nerofy.is_balanced(m.fc1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(m.fc1.weight) not in in_opt and id(m.fc1.bias) not in in_opt
    _step(m, opt)
    assert torch.equal(m.fc1.weight, before)


def test_all_frozen_is_one_clear_error():
    m = Net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        nerofy.wrap(m)


def test_unfrozen_after_wrapping_needs_add_param_group():
    """Documented: a parameter unfrozen after wrap is not in the optimizer (it stays unconstrained,
    role frozen in the plan) until given to it with add_param_group; its step counter starts then."""
    m = Net()
    m.fc1.requires_grad_(False)
    m, opt = nerofy.wrap(m)
    m.fc1.requires_grad_(True)
    before = m.fc1.weight.detach().clone()
    _step(m, opt)
    assert torch.equal(m.fc1.weight, before)  # not trained: not in the optimizer
    opt.add_param_group({"params": [m.fc1.weight], "layout": nerofy.NeuronLayout((0,), center=False, normalize=False)})
    _step(m, opt)
    assert not torch.equal(m.fc1.weight, before)
    assert opt.state[m.fc1.weight]["step"] == 1
    assert opt.state[m.fc2.parametrizations.weight.original]["step"] == 2


# ---- all-zero weights -----------------------------------------------------------------------
def test_all_zero_weights_get_a_direction_never_nan(caplog):
    m = Net()
    nn.init.zeros_(m.fc1.weight)
    nn.init.zeros_(m.fc2.weight)
    nn.init.zeros_(m.fc2.bias)
    with caplog.at_level(logging.INFO, logger="nerofy"):
        m, opt = nerofy.wrap(m)
    assert any("no direction" in r.getMessage() for r in caplog.records)
    for _ in range(3):
        _step(m, opt)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert constraint_error(m, wrapped_plan(m)) < 1e-5
    assert m.fc2.bias.abs().sum() > 0  # a zero bias moves (scale_floor)


# ---- zero / NaN / inf gradients -------------------------------------------------------------
def test_zero_gradient_is_a_zero_step():
    m, opt = nerofy.wrap(Net())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_gradient_neurons_skipped_with_a_warning(bad, caplog):
    m, opt = nerofy.wrap(Net())
    _step(m, opt)
    w = m.fc1.parametrizations.weight.original
    before = w.detach().clone()
    opt.zero_grad()
    m(torch.randn(4, 6)).square().mean().backward()
    w.grad[2, 1] = bad  # neuron 2 of fc1 has a bad gradient; the rest are fine
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        opt.step()
    assert any("non-finite gradient" in r.getMessage() for r in caplog.records)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    torch.testing.assert_close(w[2], before[2], rtol=0, atol=1e-6)  # the bad neuron did not move
    moved = (w - before).abs().sum(1) > 1e-6
    assert moved.sum() > 0 and not moved[2]  # the others did
    assert all(torch.isfinite(st["v"]).all() for st in opt.state.values())


def test_nonfinite_gradients_poison_when_check_disabled():
    """Documented: skip_nonfinite=False removes the per-step host sync; NaN then flows like in Adam."""
    m, opt = nerofy.wrap(Net(), skip_nonfinite=False)
    for p in m.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert not torch.isfinite(m.fc1.parametrizations.weight.original).all()


# ---- tied parameters with conflicting axes --------------------------------------------------
class Conflict(nn.Module):
    """One (8, 8) weight used as F.linear (neurons along axis 0) and as x @ W (along axis 1)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x):
        return F.linear(x, self.w) + x @ self.w


def test_tied_conflicting_axes_choose_warn_and_say_so_in_the_plan(caplog):
    m = Conflict()
    x = torch.randn(4, 8)
    plan = nerofy.plan(m, (x,))
    e = plan["w"]
    assert e.role == "neuron" and e.axes in ((0,), (1,))
    assert any("disagree on the neuron axes" in w for w in e.warnings), e.warnings
    assert any(w.startswith("w:") and "disagree" in w for w in plan.warnings)
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        m, opt = nerofy.wrap(m, plan=plan)
    assert any("disagree" in r.getMessage() for r in caplog.records)
    for _ in range(2):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    assert constraint_error(m, plan) < 1e-5


def test_tied_conflicting_axes_can_be_overridden():
    m = Conflict()
    plan = nerofy.plan(m, (torch.randn(4, 8),))
    plan.override("w", axis=1)
    m, _ = nerofy.wrap(m, plan=plan)
    assert m.parametrizations.w[0].layout.axes == (1,)


# ---- checkpoints across the wrapped / plain boundary (see also tests/test_checkpoint.py) ----
def test_plain_checkpoint_into_wrapped_and_wrapped_into_plain():
    src = Net()
    m, _ = nerofy.wrap(Net())
    m.load_state_dict(src.state_dict())  # projected, logged (test_checkpoint)
    with pytest.raises(RuntimeError, match=r"parametrizations\.weight\.original"):
        Net().load_state_dict(m.state_dict())


def test_batchnorm_example_input_of_one_sample_says_to_pass_two():
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="pass a batch of at least 2"):
        nerofy.plan(m, (torch.randn(1, 8),))
    assert nerofy.plan(m, (torch.randn(2, 8),))["0.weight"].role == "neuron"


def test_default_loss_leaves_out_masked_logits_but_keeps_nan():
    import torch

    from nerofy.check import default_loss

    x = torch.tensor([1.0, 2.0, float("-inf")], requires_grad=True)
    y = torch.tensor([3.0], requires_grad=True)
    loss = default_loss({"logits": x, "h": y})
    assert loss.item() == pytest.approx((1 + 4) / 2 + 9)  # the -inf entry is a mask, not an output
    loss.backward()
    assert x.grad.tolist() == [1.0, 2.0, 0.0]
    assert torch.isnan(default_loss((torch.tensor([1.0, float("nan")], requires_grad=True),)))
    with pytest.raises(RuntimeError, match="masks only"):
        default_loss(torch.full((3,), float("-inf"), requires_grad=True))
