"""accelerate with a wrapped model (issue 13, item 3), on a tiny GPT-2 (tied head), CPU.

* prepare / accumulate / clip_grad_norm_ train a wrapped model with Nero;
* save_state (safetensors, the default) + load_state resume exactly: an interrupted run equals the
  uninterrupted one (weights and Nero's state);
* save_model writes the wrapped state_dict (as accelerate's own load_checkpoint_in_model expects),
  which loads back into a wrapped model to the same outputs; the plain export for the plain
  architecture is unwrap_model(model).save_pretrained(d, state_dict=accelerator.get_state_dict(model)).
"""
from __future__ import annotations

import pytest
import torch

import nerofy

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 40


def _cfg():
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
                                   eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _wrapped(seed=0):
    torch.manual_seed(seed)
    return nerofy.wrap(transformers.GPT2LMHeadModel(_cfg()), lr=0.02,
                       example_inputs={"input_ids": torch.zeros(1, 8, dtype=torch.long)})


def _batch(step):
    return torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(step))


def _steps(acc, model, opt, start, n, accum=1):
    model.train()
    for s in range(start, start + n):
        with acc.accumulate(model):
            b = _batch(s)
            acc.backward(model(input_ids=b, labels=b).loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=_batch(99)).logits


def _nero(opt):
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
    return [inner.state[p] for g in inner.param_groups for p in g["params"]]


def test_accumulate_and_clip_train_a_wrapped_model():
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = acc.prepare(*_wrapped())
    before = _logits(model)
    _steps(acc, model, opt, 0, 4, accum=2)
    states = _nero(opt)
    assert states and all(int(st["step"]) == 2 for st in states)  # 4 micro-batches, 2 optimizer steps
    assert not torch.allclose(_logits(model), before, atol=1e-3)
    # the balanced weights stay balanced through accelerate's optimizer wrapper
    w = acc.unwrap_model(model).transformer.h[0].mlp.c_fc.parametrizations.weight.original
    assert torch.allclose(w.sum(0), torch.zeros(w.shape[1]), atol=1e-5)  # GPT-2 Conv1D: neurons are columns
    assert torch.allclose(w.norm(dim=0), torch.ones(w.shape[1]), atol=1e-5)


def test_save_state_and_load_state_resume_exactly(tmp_path):
    acc = accelerate.Accelerator(cpu=True)
    full, opt_full = acc.prepare(*_wrapped())
    _steps(acc, full, opt_full, 0, 6)

    acc2 = accelerate.Accelerator(cpu=True)
    part, opt_part = acc2.prepare(*_wrapped())
    _steps(acc2, part, opt_part, 0, 3)
    acc2.save_state(str(tmp_path))  # safetensors: every entry of the wrapped state_dict is a tensor
    assert (tmp_path / "model.safetensors").exists()

    acc3 = accelerate.Accelerator(cpu=True)
    resumed, opt_res = acc3.prepare(*_wrapped(seed=5))
    acc3.load_state(str(tmp_path))
    _steps(acc3, resumed, opt_res, 3, 3)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for x, y in zip(_nero(opt_full), _nero(opt_res)):
        assert x["step"] == y["step"] == 6 and torch.equal(x["v"], y["v"])


def test_save_model_loads_back_into_a_wrapped_model(tmp_path):
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(*_wrapped())
    _steps(acc, model, opt, 0, 2)
    acc.save_model(model, str(tmp_path))
    fresh, _ = _wrapped(seed=3)
    accelerate.utils.load_checkpoint_in_model(fresh, str(tmp_path), strict=True)
    assert torch.equal(_logits(fresh), _logits(model))


def test_the_plain_export_through_accelerate_loads_into_the_plain_architecture(tmp_path):
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(*_wrapped())
    _steps(acc, model, opt, 0, 2)
    acc.unwrap_model(model).save_pretrained(str(tmp_path), state_dict=acc.get_state_dict(model))
    plain = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path))
    assert not nerofy.is_wrapped(plain)
    assert torch.allclose(_logits(plain), _logits(model), atol=1e-5)
