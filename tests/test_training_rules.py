"""The training defaults of issue 18: signal gains, balanced tables, the paper's update.

* gains (nerofy.gains): a balanced layer fed by activation phi gets 1/rms(phi(z)), found from the
  graph by every frontend, recorded in the plan; normalised models are unchanged by it;
* residual branches on a stream that starts as table rows get their gain times those rows' rms;
* tables: lookup tables balanced per row, additive tables per vector along the feature dim they
  are added to, logit biases (added to attention logits) left free;
* update="paper": the stored tensor's gradient is the full weight gradient, so wrap + Nero is the
  paper's algorithm on the plain model, step for step.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy
from nerofy import gains
from nerofy.check import constraint_error
from nerofy.plan import make_plan
from nerofy.rewrite import wrapped_plan

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


class ByHand(nn.Module):
    """Activations written from elementary ops (as HF writes gelu_new), reflected operators, and
    affine maps of a pre-activation (no nonlinearity: gain 1)."""

    def __init__(self):
        super().__init__()
        self.l = nn.ModuleList(nn.Linear(8 if i == 0 else 16, 16) for i in range(8))
        self.act = nn.ReLU()

    def forward(self, x):
        a, b, c, d, e, f, g, h = self.l
        x = a(x)
        x = b((0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))))
              .view(-1, 16))                           # HF's gelu_new, then a view (as Conv1D takes it)
        x = c(x * torch.sigmoid(x))                    # silu by hand
        x = d(self.act(x) ** 2)                        # squared ReLU (an activation module, then maths)
        x = e(2 - torch.sigmoid(x))                    # a reflected operator: 2 - s, not s - 2
        x = f(1 / (1 + torch.exp(-x)))                 # sigmoid by hand, 1 / t reflected
        x = g(2.0 * x + 1.0)                           # affine: keeps gain 1
        return h(3.0 * F.relu(x))                      # a scaled activation: 1 / rms(3 relu(z))


def _rms_gain(fn):
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return 1 / float(fn(z).pow(2).mean().sqrt())


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_activations_written_from_elementary_ops_get_their_gain(frontend):
    plan = make_plan(ByHand(), (torch.randn(2, 8),), frontends=(frontend,))
    want = {
        "l.1": gains.gain(("gelu", (("approximate", "tanh"),))),
        "l.2": gains.gain(("silu", ())),
        "l.3": _rms_gain(lambda z: F.relu(z) ** 2),
        "l.4": _rms_gain(lambda z: 2 - torch.sigmoid(z)),
        "l.5": gains.gain(("sigmoid", ())),
        "l.6": 1.0,
        "l.7": HE / 3,
    }
    for n, g in want.items():
        e = plan[n + ".weight"]
        assert e.signal_gain() == pytest.approx(g, rel=2e-3), (frontend, n, e.signal, e.reason)
    assert "z" in plan["l.1.weight"].reason and plan["l.0.weight"].signal_gain() == 1.0
    back = nerofy.Plan.from_dict(json.loads(plan.to_json()))  # the composite's moments travel in the plan
    assert back["l.1.weight"].signal_gain() == pytest.approx(want["l.1"])


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
# residual branches on a stream of table rows
# ---------------------------------------------------------------------------------------------
class PreNorm(nn.Module):
    """Pre-norm blocks on token rows + position rows (the tokens' stream), a post-norm block, and a
    stream that starts scaled (so no longer at the rows' scale)."""

    def __init__(self, d=16, t=6, post=False, scaled=False, routed=False):
        super().__init__()
        self.tok = nn.Embedding(20, d)
        self.pos = nn.Parameter(torch.randn(1, t, d) * 0.02)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(d, 20)
        self.router = nn.Linear(d, 2)
        self.post, self.scaled, self.routed = post, scaled, routed

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        if self.scaled:
            x = x * 4.0
        if self.post:
            x = self.ln1(x + self.attn(x))  # post-norm: the sum is normalised, the stream restarts at rms 1
        else:
            x = x + self.drop(self.attn(self.ln1(x)))
        h = self.fc2(F.relu(self.fc1(self.ln2(x))))
        if self.routed:  # weighted by a router, as a mixture of experts combines: no rule scales it
            h = torch.softmax(self.router(self.ln2(x)), -1)[..., :1] * h
        x = x + h
        return self.head(self.ln3(x))


def _idx():
    return (torch.randint(0, 20, (2, 6)),)


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_residual_branches_enter_at_the_scale_of_the_rows_their_stream_starts_as(frontend):
    plan = make_plan(PreNorm(), _idx(), frontends=(frontend,))
    rms = math.sqrt(2 / 16)  # token rows and position rows, each unit norm over 16 features
    for name, base in (("attn.weight", 1.0), ("fc2.weight", HE)):
        e = plan[name]
        assert e.stream == ("pos", "tok.weight"), (name, e.reason)
        assert e.stream_rms == pytest.approx(rms) and e.signal_gain() == pytest.approx(base * rms)
        assert "residual stream" in e.reason
    for name in ("fc1.weight", "head.weight"):  # not added to the stream
        assert plan[name].stream == () and plan[name].signal_gain() == 1.0


@pytest.mark.parametrize("kind", ["post", "scaled", "routed"])
def test_no_stream_factor_where_the_stream_is_not_at_the_rows_scale(kind):
    """Post-norm and scaled streams are not at the rows' scale; a stream that also takes a term no
    rule scales (routed) keeps every branch's gain, so the branches keep their mix."""
    plan = nerofy.plan(PreNorm(**{kind: True}), _idx())
    # post: ln1's output + fc2's branch, normalised by ln3 next, is a post-norm block: gain 1
    want = 1.0 if kind == "post" else HE
    assert plan["fc2.weight"].stream == () and plan["fc2.weight"].signal_gain() == pytest.approx(want)
    assert plan["fc2.weight"].post_norm == (kind == "post")
    assert plan["attn.weight"].signal_gain() == 1.0


class PostNormBlocks(nn.Module):
    """BERT's block: ``norm(x + f(x))`` with ``x`` a norm's output; or pre-norm (``x + f(norm(x))``,
    the sum carried on to the next block and a final norm)."""

    def __init__(self, d=16, pre=False, blocks=2):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.ln0 = nn.LayerNorm(d)
        self.fc1 = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(blocks))
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.out = nn.Linear(d, 3)
        self.pre = pre

    def forward(self, x):
        x = self.ln0(self.inp(x))
        for fc1, fc2, ln in zip(self.fc1, self.fc2, self.ln):
            if self.pre:
                x = x + fc2(F.gelu(fc1(ln(x))))
            else:
                x = ln(x + fc2(F.gelu(fc1(x))))
        return self.out(x)


@pytest.mark.parametrize("frontend", ["fx", "record"])
def test_a_post_norm_branch_ends_at_gain_1(frontend):
    gelu = nerofy.gains.gain(("gelu", ()))
    plan = make_plan(PostNormBlocks(), (torch.randn(2, 8),), frontends=(frontend,))
    for i in range(2):
        e = plan[f"fc2.{i}.weight"]
        assert e.post_norm and e.signal_gain() == 1.0 and "post-norm" in e.reason
        assert plan[f"fc1.{i}.weight"].signal_gain() == 1.0  # its input is a norm's output
    pre = make_plan(PostNormBlocks(pre=True), (torch.randn(2, 8),), frontends=(frontend,))
    for i in range(2):  # the pre-norm sum goes on to the next block: the branch keeps its signal gain
        e = pre[f"fc2.{i}.weight"]
        assert not e.post_norm and e.signal_gain() == pytest.approx(gelu)


def test_stream_factor_follows_the_tables_overrides_and_json():
    plan = nerofy.plan(PreNorm(), _idx())
    plan.override("pos", gain=3.0)
    assert plan["attn.weight"].signal_gain() == pytest.approx(math.sqrt((1 + 9) / 16))
    back = nerofy.Plan.from_dict(json.loads(plan.to_json()))
    assert back["fc2.weight"].stream == ("pos", "tok.weight")
    assert back["fc2.weight"].signal_gain() == pytest.approx(HE * math.sqrt(10 / 16))
    plan.override("tok.weight", balanced=False)  # a free table: its scale is the user's, no factor
    assert plan["attn.weight"].stream_rms is None and plan["attn.weight"].signal_gain() == 1.0


def test_wrapped_branch_output_has_the_rows_scale():
    torch.manual_seed(0)
    idx = torch.randint(0, 20, (64, 6))
    ratios = {}
    for scale in ("signal", "unit"):
        m, _ = nerofy.wrap(PreNorm(), example_inputs=(idx[:2],), scale=scale)
        seen = {}
        m.attn.register_forward_hook(lambda mod, i, o: seen.__setitem__("branch", o))
        m.fc2.register_forward_hook(lambda mod, i, o: seen.__setitem__("mlp", o))
        with torch.no_grad():
            m(idx)
            rows = m.tok(idx) + m.pos
        ratios[scale] = [float(seen[k].pow(2).mean().sqrt() / rows.pow(2).mean().sqrt()) for k in ("branch", "mlp")]
        assert constraint_error(m, wrapped_plan(m)) < 1e-5
    assert all(0.5 < r < 2.0 for r in ratios["signal"]), ratios
    assert all(r > 1.5 for r in ratios["unit"]), ratios  # unit norm: the branches outweigh the token rows


# ---------------------------------------------------------------------------------------------
# step scale of gains and biases
# ---------------------------------------------------------------------------------------------
class ZeroInitBlock(nn.Module):
    """A residual block whose last BN gain starts at 0 (timm's zero_init_last), a LayerScale at
    1e-5, zero BN biases, and a free parameter (consumed by an op without a rule)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        nn.init.zeros_(self.bn2.weight)
        self.ls = nn.Parameter(torch.full((4, 1, 1), 1e-5))
        self.odd = nn.Parameter(torch.full((4,), 0.5))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = x + self.ls * self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(h.mean((2, 3)) + torch.special.erfinv(self.odd.tanh()))


def test_gains_step_at_least_lr_and_biases_at_the_papers_scale():
    torch.manual_seed(0)
    m, opt = nerofy.wrap(ZeroInitBlock(), example_inputs=(torch.randn(2, 4, 5, 5),))
    plan = wrapped_plan(m)
    assert plan["bn2.weight"].role == "gain" and plan["ls"].role == "gain" and plan["odd"].role == "free"
    x, y = torch.randn(8, 4, 5, 5), torch.randint(0, 3, (8,))
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    scale = {n: opt.state[p]["scale"] for n, p in m.named_parameters()}
    assert scale["bn2.weight"] == 1.0 and scale["ls"] == 1.0
    assert scale["bn1.weight"] == 1.0  # initialised at 1: unchanged
    assert scale["bn2.bias"] == 0.01  # biases: the paper's floor for an all-zero tensor
    assert scale["head.bias"] == pytest.approx(float(start["head.bias"].abs().mean()))  # its mean magnitude
    assert scale["odd"] == pytest.approx(0.5)  # not a gain: the paper's mean magnitude
    moved = {n: float((p.detach() - start[n]).abs().max()) for n, p in m.named_parameters()}
    assert moved["bn2.weight"] > 0.02 and moved["ls"] > 0.02  # ~lr per step, not lr * 1e-5
    # the paper's scale (min_scale 0): the zero-init gain crawls at lr * 0.01, the LayerScale at lr * 1e-5
    m2, opt2 = nerofy.wrap(ZeroInitBlock(), example_inputs=(torch.randn(2, 4, 5, 5),), min_scale=0.0)
    start = {n: p.detach().clone() for n, p in m2.named_parameters()}
    for _ in range(10):
        opt2.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        opt2.step()
    moved2 = {n: float((p.detach() - start[n]).abs().max()) for n, p in m2.named_parameters()}
    assert moved2["bn2.weight"] < 0.002 and moved2["ls"] < 1e-5


def test_nero_min_scale_is_checked_and_defaults_to_the_papers_scale():
    w = nn.Parameter(torch.zeros(5))
    opt = nerofy.Nero([w])
    w.grad = torch.ones(5)
    opt.step()
    assert opt.state[w]["scale"] == 0.01  # the paper's floor for an all-zero tensor
    torch.testing.assert_close(w.detach(), torch.full((5,), -0.01 * 0.01))
    v = nn.Parameter(torch.zeros(5))
    opt = nerofy.Nero([v], min_scale=1.0)
    v.grad = torch.ones(5)
    opt.step()
    torch.testing.assert_close(v.detach(), torch.full((5,), -0.01))
    for bad in (-1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="min_scale"):
            nerofy.Nero([v], min_scale=bad)


# ---------------------------------------------------------------------------------------------
# the paper's update through the rewrite
# ---------------------------------------------------------------------------------------------
def _paired(update):
    """A wrapped MLP and the plain MLP holding the same (balanced) weights, with their Neros."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    wrapped, opt_w = nerofy.wrap(copy.deepcopy(net), example_inputs=(torch.randn(2, 8),), scale="unit",
                                 update=update, fused=False, min_scale=0.0)  # biases at the paper's scale
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


# ---------------------------------------------------------------------------------------------
# long chains of layers in series: the plan's chain and Nero's cap on them
# ---------------------------------------------------------------------------------------------
def plain_mlp(depth: int, width: int = 16) -> nn.Sequential:
    layers = [nn.Linear(8, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 4))


class ResidualMlp(nn.Module):
    def __init__(self, blocks: int = 30, width: int = 16):
        super().__init__()
        self.inp, self.out = nn.Linear(8, width), nn.Linear(width, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                                  nn.Linear(width, width)) for _ in range(blocks))

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class GatedLoop(nn.Module):
    """A GRU-style cell written out and run over the sequence in Python: the gate's path is not
    the shortest one, so the chain does not grow with the sequence."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp, self.z, self.n, self.out = nn.Linear(4, d), nn.Linear(2 * d, d), nn.Linear(2 * d, d), nn.Linear(d, 3)

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.z.out_features)
        for t in range(x.shape[1]):
            xt = self.inp(x[:, t])
            z = torch.sigmoid(self.z(torch.cat([xt, h], -1)))
            h = (1 - z) * h + z * torch.tanh(self.n(torch.cat([xt, h], -1)))
        return self.out(h)


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_chain_counts_layers_in_series_and_takes_the_shortcut_at_merges(frontend):
    """plan.chain: a layer adds one, a residual sum or gate takes the shortest path (every frontend)."""
    x = torch.randn(2, 8)
    for depth in (3, 20, 45):
        assert make_plan(plain_mlp(depth), (x,), (frontend,)).chain == depth
    # input layer, then each block's branch (2 layers) off a stream whose shortest path is 1 layer, then the head
    assert make_plan(ResidualMlp(30), (x,), (frontend,)).chain == 3
    if frontend == "record":  # fx cannot trace the loop over a tensor's size; export unrolls it too
        short, long_ = (make_plan(GatedLoop(), (torch.randn(2, t, 4),), (frontend,)).chain for t in (5, 40))
        assert short == long_ <= 4


def test_chain_of_conv_nets_and_leaf_modules():
    """A plain BN conv stack counts every conv (a norm does not end a chain); opaque leaves with
    weights (an LSTM) count as one layer."""
    convs = []
    for i in range(14):
        convs += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    net = nn.Sequential(*convs, nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    assert make_plan(net, (torch.randn(2, 3, 4, 4),)).chain == 15

    class Rnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lstm, self.head = nn.Embedding(10, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 10)

        def forward(self, ids):
            return self.head(self.lstm(self.emb(ids))[0])
    assert make_plan(Rnn(), (torch.randint(0, 10, (2, 5)),)).chain == 3


def _spike_angles(model, opt, x):
    """Per-neuron angles of every balanced weight at a step with a gradient 1e4x the history's."""
    from nerofy.rewrite import _optimizer_tensors

    ws = [t for e, t in _optimizer_tensors(model, wrapped_plan(model)) if e.role == "neuron"]
    for s in range(12):
        before = [w.detach().clone() for w in ws]
        opt.zero_grad()
        (model(x).square().sum() * (1e4 if s == 11 else 1.0)).backward()
        opt.step()
    return torch.cat([_row_angles(b, w.detach()) for b, w in zip(before, ws)])


def _row_angles(a, b):
    ua, ub = F.normalize(a.double().flatten(1), dim=1), F.normalize(b.double().flatten(1), dim=1)
    return 2 * torch.asin((ua - ub).norm(dim=1) / 2)


def test_a_long_chain_gets_a_shorter_cap_that_any_nero_applies():
    """wrap on a 30-layer plain MLP: Nero's cap (2 lr) times CHAIN_REF / 30, carried by the tensors,
    so wrap's optimizer, Nero(model.parameters()), Nero(param_groups(model)) and a deep copy all
    apply it; chain_ref=None switches it off; a residual net of the same depth keeps the cap."""
    from nerofy.plan import CHAIN_REF

    lr, x = 0.01, torch.randn(16, 8)
    cap = 2 * lr * CHAIN_REF / 30
    torch.manual_seed(0)
    model, opt = nerofy.wrap(plain_mlp(30), lr=lr, example_inputs=(x[:2],))
    assert wrapped_plan(model).chain == 30
    assert "layers in series: 30" in str(wrapped_plan(model))
    twin = copy.deepcopy(model)
    ang = _spike_angles(model, opt, x)
    assert ang.max().item() <= math.asin(cap) * (1 + 1e-4)
    assert ang.max().item() > 0.9 * cap  # the spike's step is at the cap
    for make in (lambda m: nerofy.Nero(m.parameters(), lr=lr), lambda m: nerofy.Nero(nerofy.param_groups(m), lr=lr)):
        ang = _spike_angles(twin, make(twin), x)
        assert ang.max().item() <= math.asin(cap) * (1 + 1e-4)
    torch.manual_seed(0)
    model, opt = nerofy.wrap(plain_mlp(30), lr=lr, example_inputs=(x[:2],), chain_ref=None)
    assert _spike_angles(model, opt, x).max().item() > 1.5 * lr  # the full cap, 2 lr
    torch.manual_seed(0)
    model, opt = nerofy.wrap(ResidualMlp(15), lr=lr, example_inputs=(x[:2],))
    assert wrapped_plan(model).chain == 3 and _spike_angles(model, opt, x).max().item() > 1.5 * lr


def test_chain_in_the_plan_json_and_bad_chain_ref():
    x = torch.randn(2, 8)
    plan = make_plan(plain_mlp(20), (x,))
    back = nerofy.Plan.from_dict(json.loads(plan.to_json()))
    assert back.chain == plan.chain == 20 and plan.summary()["chain"] == 20
    for bad in (0, 2.5, True, "12"):
        with pytest.raises(ValueError, match="chain_ref"):
            nerofy.wrap(plain_mlp(3), example_inputs=(x,), chain_ref=bad)
