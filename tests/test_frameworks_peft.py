"""peft with a wrapped model (issue 13, item 7): LoRA on a tiny GPT-2.

* ``nerofy.wrap(peft_model, example_inputs={"input_ids": ...})``: dict inputs bind as keywords to
  ``PeftModel.forward(*args, **kwargs)``; the frozen base stays frozen, the adapters are planned;
* ``PeftModel.save_pretrained`` of the wrapped model writes the plain adapter, which
  ``PeftModel.from_pretrained`` on the plain base loads to the same outputs.
"""
from __future__ import annotations

import pytest
import torch

import nerofy

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 40


def _base():
    torch.manual_seed(0)  # the same frozen base every time
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _lora(model):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True)
    return peft.get_peft_model(model, cfg)


def _ids(seed, n=2):
    return torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(seed))


def test_dict_inputs_bind_as_keywords_to_a_kwargs_forward():
    pm = _lora(_base())
    plan = nerofy.plan(pm, example_inputs={"input_ids": _ids(0)})
    assert ("fx", "skipped: keyword inputs (a symbolic trace takes positional inputs only)") in plan.attempts
    assert plan.frontend == "record"
    trainable = [e for e in plan if e.role != "frozen"]
    assert trainable and all(".lora_" in e.name for e in trainable)
    # lora_A (r, in) and lora_B (out, r) are nn.Linear weights: one neuron per output row
    assert all(e.role == "neuron" and e.axes == (0,) for e in trainable)
    assert all(e.role == "frozen" for e in plan if ".lora_" not in e.name)


def test_a_key_that_names_no_parameter_is_one_clear_error():
    with pytest.raises(ValueError, match=r"'input_idz'.*close: input_ids"):
        nerofy.plan(_base(), example_inputs={"input_idz": _ids(0)})


def test_peft_save_pretrained_loads_on_the_plain_base_with_the_same_outputs(tmp_path):
    pm = _lora(_base())
    model, opt = nerofy.wrap(pm, lr=0.02, example_inputs={"input_ids": _ids(0)})
    for s in range(3):
        ids = _ids(10 + s)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=_ids(99)).logits
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and all(".lora_" in k and "parametrizations" not in k for k in saved)
    plain = peft.PeftModel.from_pretrained(_base(), str(tmp_path)).eval()
    assert not nerofy.is_wrapped(plain)
    with torch.no_grad():
        got = plain(input_ids=_ids(99)).logits
    assert torch.allclose(got, ref, atol=1e-5)
    # the adapter moved: the export is not the untrained LoRA
    with torch.no_grad():
        untouched = _lora(_base()).eval()(input_ids=_ids(99)).logits
    assert not torch.allclose(got, untouched, atol=1e-3)


def test_keep_function_keeps_a_fresh_lora_model_and_its_zero_adapters_train():
    """LoRA's B starts at zero, so the adapted model starts as the base: keep="function" keeps that
    (the default wrap gives B a random balanced direction and moves the logits), and B, left
    unconstrained as an all-zero tensor, moves from zero in training."""
    ids = _ids(0)
    base_logits = _base()(input_ids=ids).logits
    model, opt = nerofy.wrap(_lora(_base()), example_inputs={"input_ids": ids}, keep="function")
    assert (model(input_ids=ids).logits - base_logits).abs().max() < 1e-5
    plan = nerofy.rewrite.wrapped_plan(model)
    bs = [e for e in plan if ".lora_B." in e.name]
    assert bs and all(e.role == "free" for e in bs)
    assert all(e.kept for e in plan if ".lora_A." in e.name)
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    b = dict(model.named_parameters())
    assert any(float(p.detach().abs().sum()) > 0 for n, p in b.items() if ".lora_B." in n)
    default, _ = nerofy.wrap(_lora(_base()), example_inputs={"input_ids": ids})
    assert (default(input_ids=ids).logits - base_logits).abs().max() > 1e-2
