"""The plan: frontends and their fallbacks, shared parameters, frozen ones, the Plan API, and one
clear error for each kind of bad input."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy
from nerofy.plan import ROLES, Plan, make_plan


pytestmark = pytest.mark.usefixtures("single_thread")


def _layout(e):
    return (e.role, e.axes, e.split_axis, e.groups)


class Mixed(nn.Module):
    """One of most things: conv, grouped transposed conv, (in, out) matmul weight, einsum, norm,
    layer scale, position embedding, tied embedding/head, a frozen layer."""

    def __init__(self, tied: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        self.proj = nn.Parameter(torch.randn(4, 6) * 0.1)      # (in, out), x @ W
        self.pos = nn.Parameter(torch.zeros(1, 64, 6))
        self.heads = nn.Parameter(torch.randn(2, 3, 5) * 0.1)  # einsum per-head (h, d, e)
        self.ls = nn.Parameter(torch.full((10,), 0.1))
        self.emb = nn.Embedding(12, 10)
        self.head = nn.Linear(10, 12, bias=False)
        if tied:
            self.head.weight = self.emb.weight                # tied
        self.frozen = nn.Linear(10, 10)
        self.frozen.requires_grad_(False)

    def forward(self, img, tok):  # img (b, 3, 4, 4), tok (b,)
        y = self.up(F.relu(self.bn(self.conv(img))))          # (b, 4, 8, 8)
        t = y.flatten(2).transpose(1, 2) @ self.proj + self.pos  # (b, 64, 6)
        t = torch.einsum("bnhd,hde->bnhe", t.unflatten(-1, (2, 3)), self.heads).flatten(2)  # (b, 64, 10)
        h = t.mean(1) * self.ls + self.emb(tok)
        return self.head(self.frozen(h))


def mixed_inputs():
    return torch.randn(2, 3, 4, 4), torch.randint(0, 12, (2,))


MIXED_WANT = {
    "conv.weight": ("neuron", (0,), None, 1), "conv.bias": ("bias", None, None, 1),
    "bn.weight": ("gain", None, None, 1), "bn.bias": ("bias", None, None, 1),
    "up.weight": ("neuron", (1,), 0, 2), "up.bias": ("bias", None, None, 1),
    "proj": ("neuron", (1,), None, 1), "pos": ("additive", (0, 1), None, 1),  # balanced per vector
    "heads": ("neuron", (0, 2), None, 1), "ls": ("gain", None, None, 1),
    "emb.weight": ("neuron", (0,), None, 1),        # tied: the head's neurons are the embedding rows
    "frozen.weight": ("frozen", (0,), None, 1), "frozen.bias": ("frozen", None, None, 1),
}


# ---------------------------------------------------------------------------------------------
# frontends
# ---------------------------------------------------------------------------------------------
def test_plan_uses_fx_first():
    plan = nerofy.plan(Mixed(), mixed_inputs())
    assert plan.frontend == "fx"
    assert plan.attempts[0] == ("fx", "ok")
    assert {n: _layout(plan[n]) for n in MIXED_WANT} == MIXED_WANT
    assert not plan.warnings


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_each_frontend_gives_the_same_plan(frontend):
    model = Mixed()
    ref = make_plan(model, mixed_inputs(), frontends=("fx",))
    plan = make_plan(model, mixed_inputs(), frontends=(frontend,))
    assert plan.frontend == frontend
    assert {e.name: _layout(e) for e in plan} == {e.name: _layout(e) for e in ref}
    assert {e.name: e.fan_in for e in plan} == {e.name: e.fan_in for e in ref}
    assert {n: _layout(plan[n]) for n in MIXED_WANT} == MIXED_WANT
    assert all(e.frontend == frontend for e in plan if e.role != "frozen")
    assert not plan.warnings


def test_modules_frontend_places_what_module_rules_know():
    plan = make_plan(Mixed(), mixed_inputs(), frontends=("modules",))
    assert plan.frontend == "modules"
    for n in ("conv.weight", "conv.bias", "bn.weight", "up.weight", "emb.weight"):
        assert _layout(plan[n]) == MIXED_WANT[n] or (n == "emb.weight" and plan[n].role == "embedding")
    # raw parameters need a graph: with module rules only they are left free, and the plan says so
    for n in ("proj", "pos", "heads", "ls"):
        assert plan[n].role == "free"
        assert any(n in w for w in plan.warnings)
    assert "no frontend traced the model" in plan.warnings[0]


def test_unknown_frontend_is_an_error():
    with pytest.raises(ValueError, match="unknown frontend"):
        make_plan(Mixed(), mixed_inputs(), frontends=("jit",))


class ShapeBranch(nn.Module):
    """Python control flow on a tensor's size: fx cannot trace it; the recorder can."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 4))
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        if h.shape[0] > 1:
            h = h * 2
        return self.b(h @ self.w)


class ValueBranch(ShapeBranch):
    """Python control flow on a tensor's *value*."""

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = -h
        return self.b(h @ self.w)


SHAPE_BRANCH_WANT = {"a.weight": ("neuron", (0,), None, 1), "a.bias": ("bias", None, None, 1),
                     "w": ("neuron", (1,), None, 1), "b.weight": ("neuron", (0,), None, 1)}


def test_untraceable_by_fx_falls_back_to_the_recorder():
    plan = nerofy.plan(ShapeBranch(), (torch.randn(2, 8),))
    assert plan.frontend == "record"
    assert plan.attempts[0][0] == "fx" and plan.attempts[0][1] != "ok"
    assert ("record", "ok") in plan.attempts
    assert {n: _layout(plan[n]) for n in SHAPE_BRANCH_WANT} == SHAPE_BRANCH_WANT
    assert all(e.frontend == "record" for e in plan)


def test_untraceable_by_fx_falls_back_to_export():
    plan = make_plan(ShapeBranch(), (torch.randn(2, 8),), frontends=("fx", "export"))
    assert plan.frontend == "export"
    assert [a[0] for a in plan.attempts] == ["fx", "export"]
    assert {n: _layout(plan[n]) for n in SHAPE_BRANCH_WANT} == SHAPE_BRANCH_WANT


def test_no_frontend_warns_and_names_the_fallback_parameters(caplog):
    # no example inputs: fx fails, the recorder and export are skipped, module rules place the rest
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        plan = make_plan(ShapeBranch(), None)
    assert plan.frontend == "modules"
    assert [a[0] for a in plan.attempts] == ["fx", "record", "export"]
    w = plan.warnings[0]
    assert "no frontend traced the model" in w
    for n in ("a.weight", "a.bias", "b.weight", "b.bias"):
        assert n in w
    assert plan["a.weight"].frontend == "modules" and _layout(plan["a.weight"]) == ("neuron", (0,), None, 1)
    assert plan["w"].role == "free" and any("w" in x and "free" in x for x in plan.warnings[1:])
    assert any("no frontend traced the model" in r.getMessage() for r in caplog.records)


def test_value_dependent_control_flow_still_gets_a_plan():
    """fx fails; the recorder cannot branch on meta values, so it records one real forward."""
    model = ValueBranch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = nerofy.plan(model, (torch.randn(2, 8),))
    assert plan.frontend == "record"
    assert plan.attempts[0][0] == "fx" and plan.attempts[0][1] != "ok"
    assert {n: _layout(plan[n]) for n in SHAPE_BRANCH_WANT} == SHAPE_BRANCH_WANT
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_value_dependent_control_flow_without_inputs_uses_module_rules():
    plan = nerofy.plan(ValueBranch())
    assert plan.frontend == "modules"
    assert "no frontend traced the model" in plan.warnings[0]


def test_opaque_modules_under_record_do_not_warn():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    plan = make_plan(M(), (torch.randn(3, 2, 4),), frontends=("record",))
    assert plan.frontend == "record"
    assert not plan.warnings, plan.warnings


def test_unreached_parameter_gets_a_role_and_a_warning():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)      # never called: a module rule places it
            self.orphan = nn.Parameter(torch.randn(3, 3))  # never used, no rule: free

        def forward(self, x):
            return self.used(x)

    plan = nerofy.plan(M(), (torch.randn(2, 4),))
    assert plan.frontend == "fx"
    assert _layout(plan["unused.weight"]) == ("neuron", (0,), None, 1)
    assert "not reached" in plan["unused.weight"].reason
    assert plan["orphan"].role == "free"
    assert any("unused.weight" in w for w in plan.warnings)
    assert any("orphan" in w for w in plan.warnings)


def test_default_inputs_from_timm_style_config():
    """No example inputs, but the model declares pretrained_cfg['input_size']: shapes are known."""
    model = ShapeBranch()
    model.pretrained_cfg = {"input_size": (8,)}
    plan = nerofy.plan(model)
    assert plan.frontend == "record"
    assert _layout(plan["w"]) == ("neuron", (1,), None, 1)


# ---------------------------------------------------------------------------------------------
# shared parameters, frozen parameters, fan-in 1
# ---------------------------------------------------------------------------------------------
def test_tied_consistent_uses_merge_without_warning():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x)) + F.linear(x, self.a.weight)

    model = M()
    for fe in ("fx", "record", "export"):
        plan = make_plan(model, (torch.randn(2, 6),), frontends=(fe,))
        assert [e.name for e in plan] == ["a.weight", "a.bias", "b.bias"], fe
        assert _layout(plan["a.weight"]) == ("neuron", (0,), None, 1)
        assert not plan.warnings, (fe, plan.warnings)


class Conflict(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.g = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        # w: neurons on axis 0 (linear) and axis 1 (x @ w); g: a weight and an elementwise gain
        return F.linear(x, self.w) + x @ self.w + F.linear(x, self.g) * self.g.sum(0)


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_tied_conflicting_uses_resolve_deterministically_with_warning(frontend):
    plans = [make_plan(Conflict(), (torch.randn(2, 8),), frontends=(frontend,)) for _ in range(2)]
    for plan in plans:
        e = plan["w"]
        assert _layout(e) == ("neuron", (0,), None, 1)   # the first use wins
        assert e.warnings and "disagree" in e.warnings[0]
        assert any(w.startswith("w: ") and "disagree" in w for w in plan.warnings)
    assert plans[0].to_dict()["entries"] == plans[1].to_dict()["entries"]


def test_conflicting_roles_prefer_neuron_and_say_so():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return F.linear(x, self.w) + x * self.w[0]   # neuron, and a row used as a gain

    plan = nerofy.plan(M(), (torch.randn(2, 4),))
    assert _layout(plan["w"]) == ("neuron", (0,), None, 1)
    assert any("also used as gain" in w for w in plan["w"].warnings)


def test_frozen_parameters():
    model = Mixed()
    plan = nerofy.plan(model, mixed_inputs())
    assert plan["frozen.weight"].role == "frozen" and "would be neuron" in plan["frozen.weight"].reason
    assert plan["frozen.bias"].role == "frozen"
    assert plan["frozen.weight"].layout() is None
    assert plan.summary()["tensors"]["frozen"] == 2


def test_fan_in_1_is_a_gain_and_never_nan():
    model = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 2))
    plan = nerofy.plan(model, (torch.randn(3, 1),))
    assert plan["0.weight"].role == "gain" and "fan-in 1" in plan["0.weight"].reason
    assert plan["2.weight"].role == "neuron"
    with pytest.raises(ValueError, match="fan-in 1"):
        plan.override("0.weight", role="neuron")


# ---------------------------------------------------------------------------------------------
# the Plan API
# ---------------------------------------------------------------------------------------------
def test_override_exact_glob_role_axis_center():
    plan = nerofy.plan(Mixed(), mixed_inputs())
    assert plan.override("proj", role="free") == ["proj"]
    assert _layout(plan["proj"]) == ("free", None, None, 1) and plan["proj"].overridden
    names = plan.override("*.bias", role="free")
    assert set(names) == {"conv.bias", "bn.bias", "up.bias", "frozen.bias"}
    plan.override("heads", axis=(0, 1))
    assert _layout(plan["heads"]) == ("neuron", (0, 1), None, 1) and plan["heads"].fan_in == 5
    plan.override("conv.weight", center=False)
    assert plan["conv.weight"].center is False and plan["conv.weight"].layout().center is False
    plan.override("up.weight", axis=-4)                   # drops the group split, normalises the axis
    assert _layout(plan["up.weight"]) == ("neuron", (0,), None, 1)
    plan.override("pos", role="embedding")
    assert _layout(plan["pos"]) == ("embedding", (0,), None, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(pattern="nope.weight", role="free"), "no parameter matches 'nope.weight'"),
    (dict(pattern="conv.wieght", role="free"), "Did you mean: conv.weight"),
    (dict(pattern="*.nothing", role="free"), "no parameter matches"),
    (dict(pattern="proj", role="sideways"), "unknown role"),
    (dict(pattern="proj", axis=5), "out of range"),
])
def test_override_errors(kwargs, match):
    plan = nerofy.plan(Mixed(), mixed_inputs())
    pattern = kwargs.pop("pattern")
    with pytest.raises(ValueError, match=match):
        plan.override(pattern, **kwargs)


def test_getitem_unknown_name_is_a_clear_key_error():
    plan = nerofy.plan(Mixed(), mixed_inputs())
    with pytest.raises(KeyError, match="Did you mean"):
        plan["conv.weigth"]


def test_json_round_trip():
    plan = nerofy.plan(Mixed(), mixed_inputs())
    plan.override("ls", role="free")
    plan.override("conv.weight", center=False)
    d = json.loads(plan.to_json())
    again = Plan.from_dict(d)
    assert [vars(e) for e in again] == [vars(e) for e in plan]
    assert again.frontend == plan.frontend and again.warnings == plan.warnings
    assert again.attempts == plan.attempts
    assert again.to_json() == plan.to_json()
    assert d["summary"] == plan.summary()
    # the round-tripped plan still wraps the model
    model = Mixed()
    nerofy.wrap(model, plan=again)
    assert nerofy.is_wrapped(model)


def test_table_and_summary():
    model = Mixed()
    plan = nerofy.plan(model, mixed_inputs())
    table = plan.table()
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["name", "shape", "role", "axes", "fan-in"]
    assert set(lines[1]) <= {"-", " "}
    for e in plan:
        assert any(line.startswith(e.name + " ") for line in lines[2:])
    assert "1 +2g(ax0)" in table                        # grouped transposed conv
    assert "frontend: fx" in table and str(plan) == table
    s = plan.summary()
    assert set(s["tensors"]) == set(ROLES)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(s["params"].values()) == s["total_params"] == sum(p.numel() for p in model.parameters())
    assert s["total_params"] - s["params"]["frozen"] == sum(p.numel() for p in trainable)
    assert 0 < s["constrained_share"] <= 1 and s["frontend"] == "fx" and s["warnings"] == 0
    assert len(plan) == len(dict(model.named_parameters()))
    assert "Plan(" in repr(plan)


def test_every_trainable_parameter_has_exactly_one_role():
    model = Mixed()
    plan = nerofy.plan(model, mixed_inputs())
    assert [e.name for e in plan] == [n for n, _ in model.named_parameters()]
    for e in plan:
        assert e.role in ROLES and e.reason
        assert (e.role == "frozen") == (not model.get_parameter(e.name).requires_grad)
        if e.role == "neuron":
            assert e.fan_in > 1 and e.axes is not None


# ---------------------------------------------------------------------------------------------
# bad input: one clear error each
# ---------------------------------------------------------------------------------------------
def test_not_a_module():
    with pytest.raises(ValueError, match="needs a torch.nn.Module, got function"):
        nerofy.plan(lambda x: x)
    with pytest.raises(ValueError, match="needs a torch.nn.Module, got Tensor"):
        nerofy.wrap(torch.randn(3))


def test_no_parameters():
    with pytest.raises(ValueError, match="no parameters"):
        nerofy.plan(nn.ReLU())


def test_no_trainable_parameters():
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        nerofy.plan(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        nerofy.wrap(model)


@pytest.mark.parametrize("inputs", [(torch.randn(2, 5),), (torch.randn(2, 8), torch.randn(2, 8)), ("text",)])
def test_inputs_that_do_not_fit(inputs):
    with pytest.raises(ValueError, match=r"example_inputs of shapes .* do not fit Sequential"):
        nerofy.plan(nn.Sequential(nn.Linear(8, 4)), inputs)


def test_plan_for_another_model():
    plan = nerofy.plan(nn.Linear(4, 3), (torch.randn(2, 4),))
    with pytest.raises(ValueError, match="does not have"):
        nerofy.wrap(nn.Sequential(nn.Linear(4, 3)), plan=plan)
    with pytest.raises(ValueError, match="plan shape"):
        nerofy.wrap(nn.Linear(5, 3), plan=plan)


def test_plan_does_not_touch_the_model():
    model = Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nerofy.plan(model, mixed_inputs())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not nerofy.is_wrapped(model)
    assert all(p.device.type == "cpu" for p in model.parameters())
