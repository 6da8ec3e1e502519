"""Every state_dict entry is a tensor; plain exports; checkpoints without a gain (issue 13, items 1, 2).

* a wrapped model's state_dict is tensors only: safetensors' save_file round-trips it exactly;
* checkpoints written before the gain became a tensor (a dict extra state) still load;
* a wrapped tensor whose gain is missing is an error, under strict=False too (it would silently
  change the function of scale="init" models);
* nerofy.export_state_dict gives the plain weights under the original names, tied tensors tied:
  the plain architecture loads it to the same function, and so does a wrapped model (exactly, gain
  from the exported norms).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy

safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("single_thread")


class TiedLM(nn.Module):
    """Token table tied to the output head, a conv and a norm: neuron, embedding, gain, tied alias."""

    def __init__(self, vocab=20, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tok):
        h = self.emb(tok)
        h = h + F.gelu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(self.ln(F.gelu(self.fc(h))))


def _tok(seed=0):
    return torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(seed))


def _trained(scale="signal", seed=0, steps=3):
    torch.manual_seed(seed)
    m, opt = nerofy.wrap(TiedLM(), example_inputs=(_tok(),), scale=scale)
    for s in range(steps):
        tok = _tok(10 + s)
        opt.zero_grad()
        F.cross_entropy(m(tok).flatten(0, 1), tok.flatten()).backward()
        opt.step()
    return m.eval(), opt


def _out(m, seed=99):
    with torch.no_grad():
        return m(_tok(seed))


def test_every_state_dict_entry_is_a_tensor_and_safetensors_round_trips(tmp_path):
    a, _ = _trained(scale="init")
    sd = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values()), {k: type(v) for k, v in sd.items()
                                                                   if not isinstance(v, torch.Tensor)}
    gains = [k for k in sd if k.endswith("._extra_state")]
    assert gains and all(sd[k].dtype == torch.float64 and sd[k].dim() == 0 for k in gains)
    path = tmp_path / "m.safetensors"
    # safetensors refuses shared storages: a plain model's tied weights go through save_model; here the
    # wrapped state_dict shares the tied table's stored tensor, so save its clone
    safetensors_torch.save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path))
    b, _ = _trained(scale="unit", seed=5, steps=0)
    res = b.load_state_dict(safetensors_torch.load_file(str(path)))
    assert not res.missing_keys and not res.unexpected_keys
    assert b.conv.parametrizations.weight[0].scale == a.conv.parametrizations.weight[0].scale != 1.0
    assert torch.equal(_out(b), _out(a))


def test_a_checkpoint_with_the_old_dict_gain_still_loads():
    a, _ = _trained(scale="init")
    old = {k: ({"scale": float(v)} if k.endswith("._extra_state") else v) for k, v in a.state_dict().items()}
    b, _ = _trained(seed=3, steps=0)
    b.load_state_dict(old)
    assert torch.equal(_out(b), _out(a))


@pytest.mark.parametrize("strict", [True, False])
def test_a_missing_gain_is_an_error_not_a_default(strict):
    a, _ = _trained(scale="init")
    sd = {k: v for k, v in a.state_dict().items() if k != "conv.parametrizations.weight.0._extra_state"}
    b, _ = _trained(seed=3, steps=0)
    with pytest.raises(RuntimeError, match=r"conv\.parametrizations\.weight\.0\._extra_state.*missing"):
        b.load_state_dict(sd, strict=strict)


def test_export_is_the_plain_architecture_with_the_same_function():
    a, _ = _trained()
    ref = _out(a)
    ex = nerofy.export_state_dict(a)
    plain = TiedLM()
    assert set(ex) == set(plain.state_dict())  # original names, no parametrization keys or gains
    assert ex["head.weight"] is ex["emb.weight"]  # tied weights stay one tensor
    res = plain.load_state_dict(ex)
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.allclose(plain.eval()(_tok(99)), ref, atol=1e-6)
    assert nerofy.is_wrapped(a)  # export leaves the model wrapped
    assert torch.equal(_out(a), ref)


def test_safetensors_save_model_of_the_export_loads_into_the_plain_model(tmp_path):
    a, _ = _trained()
    plain = TiedLM()
    plain.load_state_dict(nerofy.export_state_dict(a))
    path = str(tmp_path / "plain.safetensors")
    safetensors_torch.save_model(plain, path)  # drops the tied copy, as HF and accelerate do
    fresh = TiedLM()
    missing, unexpected = safetensors_torch.load_model(fresh, path)
    assert not unexpected
    assert torch.allclose(fresh.eval()(_tok(99)), _out(a), atol=1e-6)


def test_the_export_loads_exactly_into_a_wrapped_model_with_its_gains(caplog):
    a, _ = _trained(scale="init")
    ex = {k: v.clone() for k, v in nerofy.export_state_dict(a).items()}
    del ex["head.weight"]  # a plain checkpoint that names the tied table once (HF drops lm_head.weight)
    b, _ = _trained(scale="unit", seed=4, steps=0)
    with caplog.at_level("INFO", logger="nerofy"):
        res = b.load_state_dict(ex)
    assert not res.missing_keys and not res.unexpected_keys
    assert any("balanced already" in r.getMessage() for r in caplog.records)
    assert not any("projected" in r.getMessage() for r in caplog.records)
    for name in ("conv", "fc", "emb"):
        got = getattr(b, name).parametrizations.weight[0].scale
        want = getattr(a, name).parametrizations.weight[0].scale
        assert got == pytest.approx(want, rel=1e-5), name
    assert torch.allclose(_out(b), _out(a), atol=1e-5)


def test_rewrapping_the_plain_export_with_scale_init_keeps_the_function():
    a, _ = _trained()
    plain = TiedLM()
    plain.load_state_dict(nerofy.export_state_dict(a))
    b, _ = nerofy.wrap(plain, example_inputs=(_tok(),), scale="init")
    assert torch.allclose(_out(b.eval()), _out(a), atol=1e-5)


def test_balanced_gain_accepts_only_centred_equal_norm_neurons():
    from nerofy.export import balanced_gain

    lay = nerofy.NeuronLayout(axes=(0,))
    w = lay.project(torch.randn(6, 5)) * 2.5
    assert balanced_gain(w, lay) == pytest.approx(2.5, rel=1e-6)
    w2 = w.clone()
    w2[0] *= 1.1  # one neuron of another norm
    assert balanced_gain(w2, lay) is None
    assert balanced_gain(w + 0.1, lay) is None  # not centred
    assert balanced_gain(torch.zeros(6, 5), lay) is None


def test_export_of_a_converted_state_dict_and_of_a_plain_model():
    a, _ = _trained()
    sd = copy.deepcopy(a.state_dict())
    ex = nerofy.export_state_dict(a, sd)
    assert torch.equal(ex["fc.weight"], a.fc.weight)
    plain = TiedLM()
    assert nerofy.export_state_dict(plain).keys() == plain.state_dict().keys()
    del sd["fc.parametrizations.weight.0._extra_state"]
    with pytest.raises(ValueError, match="gain .* is missing"):
        nerofy.export_state_dict(a, sd)
