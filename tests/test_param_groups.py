"""Layouts travel with the tensors; wrap's groups on demand; per-pattern lr (issue 13, item 6).

A Nero built any other way than wrap's (``Nero(model.parameters())``, torch-style groups with their
own lr, ``add_param_group``, after a deepcopy) must update a wrapped tensor as wrap's optimizer
does: the neuron axis of an ``x @ W`` weight is its columns, not dim 0.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy

pytestmark = pytest.mark.usefixtures("single_thread")


class MatmulNet(nn.Module):
    """Weights used as ``x @ W`` (in, out): their neurons are columns. A tied head."""

    def __init__(self, vocab=12, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.w1 = nn.Parameter(torch.randn(d, 16) / d ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(16))
        self.w2 = nn.Parameter(torch.randn(16, d) / 4)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tok):
        h = self.emb(tok)
        h = h + F.gelu(h @ self.w1 + self.b1) @ self.w2
        return self.head(self.ln(h))


def _tok(s):
    return torch.randint(0, 12, (4, 6), generator=torch.Generator().manual_seed(s))


def _model():
    torch.manual_seed(0)
    return nerofy.wrap(MatmulNet(), example_inputs=(_tok(0),), lr=0.02)


def _train(m, opt, n=3):
    for s in range(n):
        tok = _tok(10 + s)
        opt.zero_grad()
        F.cross_entropy(m(tok).flatten(0, 1), tok.flatten()).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _ref():
    return _train(*_model())


def test_the_plan_puts_matmul_neurons_on_columns():
    m, _ = _model()
    plan = nerofy.rewrite.wrapped_plan(m)
    assert plan["w1"].axes == (1,) and plan["w2"].axes == (1,)


@pytest.mark.parametrize("build", ["parameters", "torch_groups", "add_param_group", "param_groups"])
def test_any_grouping_updates_wrapped_tensors_as_wraps_optimizer(build):
    ref = _ref()
    m, _ = _model()
    if build == "parameters":
        opt = nerofy.Nero(m.parameters(), lr=0.02)
    elif build == "torch_groups":  # the head in its own group at its own lr, the torch way
        head = {id(p) for p in m.emb.parameters()}
        opt = nerofy.Nero([{"params": [p for p in m.parameters() if id(p) not in head]},
                           {"params": list(m.emb.parameters()), "lr": 0.02}], lr=0.02)
    elif build == "add_param_group":
        ps = list(m.parameters())
        opt = nerofy.Nero(ps[:2], lr=0.02)
        opt.add_param_group({"params": ps[2:]})
    else:
        opt = nerofy.Nero(nerofy.param_groups(m), lr=0.02)
    got = _train(m, opt)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-6), k
    w = m.parametrizations.w1.original  # still centred, unit-norm columns
    assert torch.allclose(w.sum(0), torch.zeros(16), atol=1e-5)
    assert torch.allclose(w.norm(dim=0), torch.ones(16), atol=1e-5)


def test_a_deepcopy_keeps_the_carried_layouts():
    ref = _ref()
    m, _ = _model()
    c = copy.deepcopy(m)
    got = _train(c, nerofy.Nero(c.parameters(), lr=0.02))
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-6), k


def test_param_groups_are_wraps_groups():
    m, opt = _model()
    mine = nerofy.param_groups(m)
    assert [(g["layout"], len(g["params"])) for g in mine] == [(g["layout"], len(g["params"])) for g in opt.param_groups]
    for a, b in zip(mine, opt.param_groups):
        assert all(x is y for x, y in zip(a["params"], b["params"]))
        assert a.get("min_scale", 0.0) == b.get("min_scale", 0.0)


def test_param_groups_of_a_plain_model_is_one_clear_error():
    with pytest.raises(ValueError, match="not wrapped by nerofy.*nerofy.wrap"):
        nerofy.param_groups(MatmulNet())


def test_lr_patterns_set_a_groups_lr_and_the_star_the_default():
    torch.manual_seed(0)
    # the tied table matches under its alias name too (head.weight is emb.weight)
    m, opt = nerofy.wrap(MatmulNet(), example_inputs=(_tok(0),), lr={"head.*": 1e-3, "w*": 0.05, "*": 0.02})
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(m.emb.parametrizations.weight.original)] == 1e-3
    assert lr_of[id(m.parametrizations.w1.original)] == lr_of[id(m.parametrizations.w2.original)] == 0.05
    assert lr_of[id(m.b1)] == 0.02 and lr_of[id(m.ln.weight)] == 0.02
    # param_groups gives the same grouping again
    again = {id(p): g.get("lr", opt.defaults["lr"]) for g in nerofy.param_groups(m) for p in g["params"]}
    assert again == lr_of


def test_an_lr_pattern_that_matches_nothing_fails_before_the_rewrite():
    model = MatmulNet()
    with pytest.raises(ValueError, match=r"'hed\.\*' matches no trainable parameter.*close names: head.weight"):
        nerofy.wrap(model, example_inputs=(_tok(0),), lr={"hed.*": 1e-3})
    assert not nerofy.is_wrapped(model)
    with pytest.raises(ValueError, match="learning rates >= 0"):
        nerofy.wrap(model, example_inputs=(_tok(0),), lr={"w1": -1.0})
