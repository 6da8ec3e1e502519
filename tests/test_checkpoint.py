"""Checkpoints of wrapped models (issue item 1 / docs/ecosystem.md "Checkpoints").

* model + optimizer state_dicts round-trip bit-exactly: a resumed run == the uninterrupted run;
* a plain checkpoint loads into a wrapped model, projected onto the balanced set, and the log says so;
* nerofy.bake gives back a plain module with the original names and identical outputs;
* torch.save(model) of a wrapped model fails with a message that points at state_dict / bake;
* a wrapped checkpoint into a plain model (and the way that works: bake a copy).
"""
from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import nerofy


pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    """conv + norm + embedding + linear head: neuron, gain, bias and embedding roles."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x, tok):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3)) + self.emb(tok)
        return self.head(self.ln(F.gelu(self.fc(h))))


def _data(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g),
            torch.randint(0, 5, (4,), generator=g))


def _train(model, opt, start: int, n: int):
    model.train()
    for s in range(start, start + n):
        x, tok, y = _data(s)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, tok), y).backward()
        opt.step()


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _wrapped(seed=0, **kw):
    torch.manual_seed(seed)
    return nerofy.wrap(Net(), **kw)


@pytest.mark.parametrize("fused", [None, False], ids=["fused_default", "foreach"])
def test_resume_equals_uninterrupted_run_bitwise(fused):
    a, opt_a = _wrapped(fused=fused)
    _train(a, opt_a, 0, 6)  # the uninterrupted run: 6 steps

    b, opt_b = _wrapped(fused=fused)
    _train(b, opt_b, 0, 3)
    ckpt = _save_load({"model": b.state_dict(), "opt": opt_b.state_dict()})  # weights_only load works
    del b, opt_b

    c, opt_c = _wrapped(seed=123, fused=fused)  # a fresh, differently initialised process
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    _train(c, opt_c, 3, 3)

    sa, sc = a.state_dict(), c.state_dict()
    assert sa.keys() == sc.keys()
    for k, v in sa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sc[k]), k
    oa, oc = opt_a.state_dict(), opt_c.state_dict()
    assert oa["param_groups"] == oc["param_groups"]
    for i, st in oa["state"].items():
        assert st["step"] == oc["state"][i]["step"] == 6
        assert st["scale"] == oc["state"][i]["scale"]
        assert oc["state"][i]["v"].dtype == torch.float32
        assert torch.equal(st["v"], oc["state"][i]["v"]), i


def test_optimizer_state_dict_is_plain_data_and_fp32():
    m, opt = _wrapped()
    _train(m, opt, 0, 1)
    sd = _save_load(opt.state_dict())
    assert all(isinstance(g["layout"], (dict, str)) for g in sd["param_groups"])
    assert all(st["v"].dtype == torch.float32 for st in sd["state"].values())


def test_model_state_dict_round_trip_exact_outputs():
    a, opt = _wrapped()
    _train(a, opt, 0, 2)
    b, _ = _wrapped(seed=7)
    b.load_state_dict(_save_load(a.state_dict()))
    a.eval(), b.eval()
    x, tok, _ = _data(99)
    with torch.no_grad():
        assert torch.equal(a(x, tok), b(x, tok))


def test_scale_init_survives_the_checkpoint():
    a, _ = _wrapped(scale="init")
    b, _ = _wrapped(seed=5, scale="unit")
    b.load_state_dict(a.state_dict())
    pa = a.conv.parametrizations.weight[0]
    pb = b.conv.parametrizations.weight[0]
    assert pb.scale == pa.scale != 1.0


# ---------------------------------------------------------------------------------------------
# plain checkpoint -> wrapped model
# ---------------------------------------------------------------------------------------------
def test_plain_checkpoint_loads_projected_and_logs(caplog):
    torch.manual_seed(3)
    plain = {k: v.clone() for k, v in Net().state_dict().items()}
    m, _ = _wrapped()
    with caplog.at_level(logging.INFO, logger="nerofy"):
        res = m.load_state_dict(plain, strict=False)
    assert not res.unexpected_keys
    assert not res.missing_keys
    assert any("projected onto the balanced set" in r.getMessage() and "changes the function" in r.getMessage()
               for r in caplog.records)
    plan = nerofy.rewrite.wrapped_plan(m)
    for name in ("conv.weight", "fc.weight", "head.weight", "emb.weight"):  # the table is balanced per row too
        mod = m.get_submodule(name.rpartition(".")[0])
        want = plan[name].layout().project(plain[name]) * mod.parametrizations.weight[0].scale
        assert torch.allclose(mod.weight, want, atol=1e-6), name
    # unconstrained parameters and buffers load as they are
    for name in ("conv.bias", "bn.weight", "bn.running_mean", "ln.bias"):
        assert torch.equal(m.state_dict()[name], plain[name]), name


def test_balanced_plain_checkpoint_loads_without_changing_the_function():
    """Loading a baked model's state_dict (already balanced) into a wrapped model keeps the outputs."""
    a, opt = _wrapped()
    _train(a, opt, 0, 2)
    a.eval()
    x, tok, _ = _data(50)
    with torch.no_grad():
        ref = a(x, tok)
    baked_sd = nerofy.bake(copy.deepcopy(a)).state_dict()
    b, _ = _wrapped(seed=9)
    b.load_state_dict(baked_sd, strict=False)
    b.eval()
    with torch.no_grad():
        assert torch.allclose(b(x, tok), ref, atol=1e-5)


def test_plain_checkpoint_loads_strict_and_keeps_the_gains():
    torch.manual_seed(3)
    plain = Net().state_dict()
    m, _ = _wrapped(scale="init")
    gain = m.conv.parametrizations.weight[0].scale
    res = m.load_state_dict(plain)  # strict=True: the hook supplies the Balanced extra state
    assert not res.missing_keys and not res.unexpected_keys
    assert m.conv.parametrizations.weight[0].scale == gain


# ---------------------------------------------------------------------------------------------
# bake
# ---------------------------------------------------------------------------------------------
def test_bake_plain_module_original_names_identical_outputs():
    torch.manual_seed(0)
    plain_names = list(Net().state_dict().keys())
    m, opt = _wrapped()
    _train(m, opt, 0, 2)
    m.eval()
    x, tok, _ = _data(7)
    with torch.no_grad():
        ref = m(x, tok)
    b = nerofy.bake(m)
    assert not any(parametrize.is_parametrized(mod) for mod in b.modules())
    assert not nerofy.is_wrapped(b)
    assert list(b.state_dict().keys()) == plain_names  # names and order
    assert type(b.conv) is nn.Conv2d and type(b.fc) is nn.Linear
    with torch.no_grad():
        assert torch.equal(b(x, tok), ref)
    # a baked model pickles and loads into a fresh plain model
    fresh = Net()
    fresh.load_state_dict(_save_load(b.state_dict()))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, tok), ref)
    buf = io.BytesIO()
    torch.save(b, buf)


def test_bake_can_be_wrapped_again():
    m, _ = _wrapped()
    nerofy.bake(m)
    m2, opt = nerofy.wrap(m)
    _train(m2, opt, 0, 1)
    assert nerofy.is_wrapped(m2)


# ---------------------------------------------------------------------------------------------
# torch.save(model) and wrapped checkpoint -> plain model
# ---------------------------------------------------------------------------------------------
def test_pickling_a_wrapped_model_fails():
    m, _ = _wrapped()
    with pytest.raises(Exception):
        torch.save(m, io.BytesIO())


def test_pickling_a_wrapped_model_error_points_at_state_dict_or_bake():
    m, _ = _wrapped()
    with pytest.raises(Exception) as ei:
        torch.save(m, io.BytesIO())
    msg = str(ei.value)
    assert "state_dict" in msg or "bake" in msg, msg


def test_wrapped_checkpoint_into_plain_model_raises_key_error_and_baking_gives_plain_keys():
    """Documented behaviour: a plain model does not know nerofy's keys (torch's strict error names
    them); to get a plain checkpoint, load the wrapped one into a wrapped model and bake that."""
    m, opt = _wrapped()
    _train(m, opt, 0, 1)
    ckpt = _save_load(m.state_dict())
    plain = Net()
    with pytest.raises(RuntimeError, match="parametrizations.weight.original"):
        plain.load_state_dict(ckpt)
    tmp, _ = _wrapped(seed=1)
    tmp.load_state_dict(ckpt)
    plain.load_state_dict(nerofy.bake(tmp).state_dict())
    m.eval(), plain.eval()
    x, tok, _ = _data(11)
    with torch.no_grad():
        assert torch.equal(plain(x, tok), m(x, tok))


def test_baking_a_deepcopy_leaves_the_original_working():
    m, opt = _wrapped()
    nerofy.bake(copy.deepcopy(m))
    _train(m, opt, 0, 1)


def test_deepcopy_does_not_keep_the_original_alive():
    import gc
    import weakref

    m, _ = _wrapped()
    c = copy.deepcopy(m)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert c is not None and ref() is None
