"""The training defaults of issue 18: signal gains, balanced tables, the paper's update.

* gains (nerofy.gains): a balanced layer fed by activation phi gets 1/std(phi(z)), found from the
  graph by every frontend, recorded in the plan; normalised models are unchanged by it;
* tables: lookup tables balanced per row, additive tables per vector along the feature dim they
  are added to, logit biases (added to attention logits) left free;
* update="paper": the stored tensor's gradient is the full weight gradient, so wrap + Nero is the
  paper's algorithm on the plain model, step for step.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy
from nerofy import gains
from nerofy.plan import make_plan

RELU_CENTRED = 1 / math.sqrt(0.5 - 1 / (2 * math.pi))  # 1/std(relu(z)), z ~ N(0, 1)
HE = math.sqrt(2)  # 1/rms(relu(z)): the default


# ---------------------------------------------------------------------------------------------
# gains
# ---------------------------------------------------------------------------------------------
def test_gain_arithmetic():
    assert gains.gain(("relu", ()), centred=True) == pytest.approx(RELU_CENTRED, rel=1e-5)
    assert gains.gain(("relu", ())) == pytest.approx(HE, rel=1e-5)  # He's gain, the default
    assert gains.gain(("leaky_relu", (("negative_slope", 1.0),)), centred=True) == pytest.approx(1.0, rel=1e-6)
    assert gains.gain(("tanh", ())) == pytest.approx(1 / float(torch.tanh(torch.randn(2_000_000,
                                                   generator=torch.Generator().manual_seed(0), dtype=torch.float64)).std()),
                                                   rel=2e-3)
    assert gains.gain(None, True) == 1.0 and gains.gain(gains.SIMILARITY, True) == 1.0


class Mlp(nn.Module):
    """Module activations, functional activations, dropout between, and inputs that are no
    activation's output (data, a norm, a residual sum)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.e, self.f = nn.Linear(16, 16), nn.Linear(16, 4)
        self.act, self.drop, self.ln = nn.ReLU(), nn.Dropout(0.0), nn.LayerNorm(16)

    def forward(self, x):
        h = self.drop(self.act(self.a(x)))                       # b: relu (through dropout)
        h = F.leaky_relu(self.b(h), 0.2)                          # c: leaky_relu(0.2)
        h = torch.tanh(self.c(h))                                 # d: tanh
        h = self.ln(self.d(h))                                    # e: a norm's output
        return self.f(h + F.gelu(self.e(h)))                      # f: a residual sum


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_each_frontend_finds_the_activation_feeding_each_layer(frontend):
    plan = make_plan(Mlp(), (torch.randn(2, 8),), frontends=(frontend,))
    want = {"a": None, "b": ("relu", ()), "c": ("leaky_relu", (("negative_slope", 0.2),)), "d": ("tanh", ()),
            "e": None, "f": None}
    assert {k: plan[f"{k}.weight"].signal for k in want} == want
    assert plan["b.weight"].signal_gain() == pytest.approx(HE, rel=1e-5)
    assert plan["a.weight"].signal_gain() == 1.0 and plan["f.weight"].signal_gain() == 1.0
    assert "1/rms" in plan["b.weight"].reason


def _relu_stack(depth=20, width=64):
    layers = [nn.Linear(32, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


@torch.no_grad()
def _preact_variances(model, x):
    out = []
    for layer in model:
        x = layer(x)
        if not isinstance(layer, nn.ReLU):
            out.append(float(x.var()))
    return out


def test_signal_gain_slows_the_signals_decay_in_a_deep_relu_stack():
    """Centred neurons remove the ReLU output's mean, so per layer the variance goes x0.34 at gain 1
    (the paper's unit norm), x0.68 at sqrt(2) (the default) and x1 at 1/std (1.71)."""
    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    ratios = {}
    for scale in ("signal", "unit"):
        torch.manual_seed(0)
        m, _ = nerofy.wrap(_relu_stack(8, 256), example_inputs=(x[:2],), scale=scale)
        for layer in m:  # no biases: the ratio is the gain's alone
            if hasattr(layer, "bias") and layer.bias is not None:
                nn.init.zeros_(layer.bias)
        v = _preact_variances(m, x)
        ratios[scale] = [b / a for a, b in zip(v[:-1], v[1:])]
    assert all(0.55 < r < 0.8 for r in ratios["signal"]), ratios  # 2 * (1/2 - 1/(2 pi)) = 0.68
    assert all(0.27 < r < 0.4 for r in ratios["unit"]), ratios    # 0.34


def test_gain_is_saved_and_override_sets_it():
    torch.manual_seed(0)
    plan = nerofy.plan(_relu_stack(4), (torch.randn(2, 32),))
    plan.override("2.weight", gain=2.5)
    m, _ = nerofy.wrap(_relu_stack(4), plan=plan)
    assert m[2].parametrizations.weight[0].scale == 2.5
    assert m[4].parametrizations.weight[0].scale == pytest.approx(HE, rel=1e-5)
    back = nerofy.Plan.from_dict(plan.to_dict())
    assert back["4.weight"].signal == ("relu", ()) and back["2.weight"].gain == 2.5
    with pytest.raises(ValueError, match="gain must be a positive"):
        plan.override("2.weight", gain=0.0)


class BnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        return self.head(h.mean((2, 3)))


def test_signal_gain_changes_nothing_on_a_normalised_model():
    x = torch.randn(4, 3, 6, 6)
    torch.manual_seed(0)
    a, _ = nerofy.wrap(BnNet(), example_inputs=(x,))
    torch.manual_seed(0)
    b, _ = nerofy.wrap(BnNet(), example_inputs=(x,), scale="unit")
    assert a.c2.parametrizations.weight[0].scale == pytest.approx(HE, rel=1e-5)  # relu feeds c2
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)  # ... but BatchNorm follows it


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
class Tables(nn.Module):
    """Token and position tables, a class token, a relative-position logit bias (gathered and
    added to logits), a T5-style bias looked up from nn.Embedding and added to logits, and a
    position map added to an NCHW conv output."""

    def __init__(self, d=16, t=6, heads=2):
        super().__init__()
        self.tok = nn.Embedding(20, d)
        self.pos = nn.Parameter(torch.randn(1, t, d) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.rel_table = nn.Parameter(torch.randn(2 * t, heads) * 0.02)
        self.register_buffer("rel_index", (torch.arange(t + 1)[:, None] - torch.arange(t + 1)[None] + t) % (2 * t))
        self.t5 = nn.Embedding(2 * t, heads)
        self.qk = nn.Linear(d, 2 * d)
        self.heads = heads
        self.conv = nn.Conv2d(3, d, 1)
        self.pos_map = nn.Parameter(torch.randn(1, d, 2, 3) * 0.02)
        self.out = nn.Linear(d, 3)

    def forward(self, idx, img):
        b, t = idx.shape
        x = self.tok(idx) + self.pos[:, :t]
        x = torch.cat([self.cls.expand(b, -1, -1), x], 1)
        q, k = self.qk(x).unflatten(-1, (self.heads, -1)).transpose(1, 2).chunk(2, -1)
        logits = q @ k.transpose(-1, -2) / 4.0
        logits = logits + self.rel_table[self.rel_index].permute(2, 0, 1)
        logits = logits + self.t5(self.rel_index).permute(2, 0, 1)
        h = (logits.softmax(-1) @ x[:, None, :, : x.shape[-1] // 2].expand(-1, self.heads, -1, -1)).flatten(1)
        f = (self.conv(img) + self.pos_map).mean((2, 3))
        return self.out(f) + h.sum(1, keepdim=True)


def _tables_inputs():
    return torch.randint(0, 20, (2, 6)), torch.randn(2, 3, 2, 3)


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_tables_are_balanced_per_vector_and_logit_biases_stay_free(frontend):
    plan = make_plan(Tables(), _tables_inputs(), frontends=(frontend,))
    e = plan["tok.weight"]
    assert (e.role, e.balanced, e.axes, e.fan_in) == ("embedding", True, (0,), 16)
    assert (plan["pos"].balanced, plan["pos"].axes, plan["pos"].fan_in) == (True, (0, 1), 16)
    assert (plan["cls"].balanced, plan["cls"].axes) == (True, (0, 1))
    assert (plan["pos_map"].balanced, plan["pos_map"].axes, plan["pos_map"].fan_in) == (True, (0, 2, 3), 16)
    for n in ("rel_table", "t5.weight"):
        assert not plan[n].balanced and not plan[n].constrained, (n, plan[n].reason)
        assert "logit" in plan[n].reason


def test_wrapped_tables_are_balanced_in_the_forward():
    torch.manual_seed(0)
    m, opt = nerofy.wrap(Tables(), example_inputs=_tables_inputs())
    rows = m.tok.weight
    torch.testing.assert_close(rows.mean(1), torch.zeros(20), atol=1e-6, rtol=0)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(20), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.pos.norm(dim=2), torch.ones(1, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.pos_map.norm(dim=1), torch.ones(1, 2, 3), atol=1e-5, rtol=0)
    assert not nerofy.is_balanced(m.t5) and "rel_table" in dict(m.named_parameters())
    x = _tables_inputs()
    for _ in range(3):
        opt.zero_grad()
        m(*x).square().mean().backward()
        opt.step()
    torch.testing.assert_close(m.tok.weight.norm(dim=1), torch.ones(20), atol=1e-5, rtol=0)


def test_override_frees_or_balances_a_table():
    plan = nerofy.plan(Tables(), _tables_inputs())
    plan.override("tok.weight", balanced=False)
    plan.override("rel_table", balanced=True)  # by default the vectors run along the last dim
    assert not plan["tok.weight"].constrained and plan["tok.weight"].layout().normalize is False
    assert plan["rel_table"].axes == (0,) and plan["rel_table"].fan_in == 2
    with pytest.raises(ValueError, match="balanced= applies to embedding and additive"):
        plan.override("qk.weight", balanced=True)
    m, _ = nerofy.wrap(Tables(), plan=plan)
    assert not nerofy.is_balanced(m.tok) and nerofy.is_balanced(m, None)


# ---------------------------------------------------------------------------------------------
# the paper's update through the rewrite
# ---------------------------------------------------------------------------------------------
def _paired(update):
    """A wrapped MLP and the plain MLP holding the same (balanced) weights, with their Neros."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    wrapped, opt_w = nerofy.wrap(copy.deepcopy(net), example_inputs=(torch.randn(2, 8),), scale="unit",
                                 update=update, fused=False)
    plain = nerofy.bake(copy.deepcopy(wrapped))
    opt_p = nerofy.Nero(plain.parameters(), fused=False)  # the paper's convention: dim>1 -> rows
    return wrapped, opt_w, plain, opt_p


def _train(model, opt, steps=6):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_paper_update_is_the_papers_algorithm_step_for_step():
    wrapped, opt_w, plain, opt_p = _paired("paper")
    _train(wrapped, opt_w)
    _train(plain, opt_p)
    for (n, a), b in zip(nerofy.bake(wrapped).named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=n)


def test_projected_update_is_not():
    wrapped, opt_w, plain, opt_p = _paired("projected")
    _train(wrapped, opt_w)
    _train(plain, opt_p)
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(nerofy.bake(wrapped).parameters(), plain.parameters()))
    assert diff > 1e-3


def test_paper_gradient_is_linear_so_accumulation_and_scaling_hold():
    torch.manual_seed(0)
    m, _ = nerofy.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                       example_inputs=(torch.randn(2, 8),))
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    v = m[0].parametrizations.weight.original
    F.cross_entropy(m(x), y, reduction="sum").backward()
    full = v.grad.clone()
    v.grad = None
    for i in (0, 4):
        (1024.0 * F.cross_entropy(m(x[i:i + 4]), y[i:i + 4], reduction="sum")).backward()  # a loss scale
    torch.testing.assert_close(v.grad / 1024.0, full, rtol=1e-5, atol=1e-6)
    # and it is the full weight gradient: its radial part is not removed
    w = m[0].weight.detach()
    assert float((full * w).sum(1).abs().max()) > 1e-4


def test_bad_update_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown update 'exact'"):
        nerofy.wrap(nn.Linear(4, 4), update="exact")
