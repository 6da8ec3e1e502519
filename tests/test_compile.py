"""torch.compile and nerofy (issue item 3 / docs/ecosystem.md "torch.compile").

* ``torch.compile(wrapped_model)`` runs and matches eager: outputs, gradients, a few training steps
  (one tiny model in the default run; bigger ones are marked slow);
* ``torch.compile(opt.step)`` matches eager Nero, foreach and default (fused) routes. Dynamo-only
  checks use ``backend="eager"`` (what matters is what dynamo traces; it compiles in a second).
  Regression: the default route once handed dynamo-traced tensors to the C kernel and lost the update.

Numbers (compile time and step time per route) are in benchmarks/results/compile_cost.md.
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy
from nerofy.check import constraint_error
from nerofy.rewrite import wrapped_plan


@pytest.fixture(autouse=True)
def _quiet_and_fresh():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    lvl = logging.getLogger("torch._dynamo").level
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.getLogger("torch._dynamo").setLevel(lvl)
    torch._dynamo.reset()
    torch.set_num_threads(n)


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))


def _train(model, opt, fwd, x, y, steps, step_fn=None):
    losses = []
    step_fn = step_fn or opt.step
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        step_fn()
        losses.append(float(loss.detach()))
    return losses


def _pair(factory, seed=0, **kw):
    torch.manual_seed(seed)
    a = nerofy.wrap(factory(), **kw)
    torch.manual_seed(seed)
    b = nerofy.wrap(factory(), **kw)
    return a, b


def test_compiled_wrapped_model_matches_eager():
    """The one default-run inductor test: a tiny MLP (compiles in seconds)."""
    (a, opt_a), (b, opt_b) = _pair(_mlp)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    cb = torch.compile(b)
    with torch.no_grad():
        torch.testing.assert_close(cb(x), a(x), rtol=1e-5, atol=1e-6)
    la = _train(a, opt_a, a, x, y, 3)
    lb = _train(b, opt_b, cb, x, y, 3)
    assert la == pytest.approx(lb, abs=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    assert constraint_error(b, wrapped_plan(b)) < 1e-5


def _step_diff(fused, backend="eager", steps=3):
    (a, opt_a), (b, opt_b) = _pair(_mlp, fused=fused)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    _train(a, opt_a, a, x, y, steps)
    _train(b, opt_b, b, x, y, steps, step_fn=torch.compile(opt_b.step, backend=backend))
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_compiled_optimizer_step_foreach_matches_eager():
    assert _step_diff(fused=False) < 1e-5


def test_compiled_optimizer_step_default_fused_matches_eager():
    assert _step_diff(fused=None) < 1e-5


# ---------------------------------------------------------------------------------------------
# slow: inductor on the step, real architectures
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_inductor_optimizer_step_foreach_matches_eager():
    assert _step_diff(fused=False, backend="inductor") < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_compiled_timm_model_matches_eager(name):
    timm = pytest.importorskip("timm")
    kw = {"img_size": 32} if name.startswith("vit") else {}
    (a, opt_a), (b, opt_b) = _pair(lambda: timm.create_model(name, num_classes=4, **kw))
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2,))
    la = _train(a, opt_a, a, x, y, 2)
    lb = _train(b, opt_b, torch.compile(b), x, y, 2)
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_compiled_hf_bert_matches_eager():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)

    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(cfg, add_pooling_layer=False)
            self.head = nn.Linear(32, 4)

        def forward(self, ids):
            return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])

    (a, opt_a), (b, opt_b) = _pair(Clf)
    x, y = torch.randint(0, 100, (2, 12)), torch.randint(0, 4, (2,))
    a.eval(), b.eval()  # no dropout: the runs must see the same function
    la = _train(a, opt_a, a, x, y, 2)
    lb = _train(b, opt_b, torch.compile(b), x, y, 2)
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-4)
