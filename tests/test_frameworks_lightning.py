"""pytorch-lightning with a wrapped model (issue 13, item 8), CPU.

* the pattern that works: wrap in ``__init__``, return ``Nero(nerofy.param_groups(...))`` from
  ``configure_optimizers``: a run resumed from a mid-run checkpoint (``fit(ckpt_path=...)``)
  equals the uninterrupted run (weights and Nero's state), and a second ``fit`` works;
* wrapping inside ``configure_optimizers`` logs a warning that names the fix.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.usefixtures("single_thread")


def _net():
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


class WrappedInInit(pl.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net, _ = nerofy.wrap(_net(), lr=0.02, example_inputs=(torch.zeros(2, 6),))

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return nerofy.Nero(nerofy.param_groups(self.net), lr=0.02)


class WrappedInHook(WrappedInInit):
    def __init__(self):
        pl.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.net = _net()

    def configure_optimizers(self):
        self.net, opt = nerofy.wrap(self.net, lr=0.02, example_inputs=(torch.zeros(2, 6),))
        return opt


def _trainer(root, max_steps, **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root), **kw)


def _nero(trainer):
    opt = trainer.optimizers[0]
    return [opt.state[p] for g in opt.param_groups for p in g["params"]]


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    full = WrappedInInit()
    t_full = _trainer(tmp_path / "full", 8, enable_checkpointing=False)
    t_full.fit(full, _data())

    ck = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=4, save_top_k=-1)
    part = WrappedInInit()
    _trainer(tmp_path / "part", 4, callbacks=[ck]).fit(part, _data())
    path = tmp_path / "ck" / "epoch=0-step=4.ckpt"
    assert path.exists()

    resumed = WrappedInInit(seed=3)  # another init: everything comes from the checkpoint
    t_res = _trainer(tmp_path / "res", 8, enable_checkpointing=False)
    t_res.fit(resumed, _data(), ckpt_path=str(path))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for x, y in zip(_nero(t_full), _nero(t_res)):
        assert x["step"] == y["step"] == 8 and torch.equal(x["v"], y["v"])


def test_a_second_fit_continues_training(tmp_path):
    m = WrappedInInit()
    _trainer(tmp_path / "a", 2, enable_checkpointing=False).fit(m, _data())
    after_first = {k: v.clone() for k, v in m.state_dict().items()}
    _trainer(tmp_path / "b", 2, enable_checkpointing=False).fit(m, _data())
    assert any(not torch.equal(after_first[k], v) for k, v in m.state_dict().items())
    w = m.net[0].parametrizations.weight.original
    assert torch.allclose(w.norm(dim=1), torch.ones(16), atol=1e-5)


def test_wrapping_inside_configure_optimizers_warns_with_the_fix(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        _trainer(tmp_path, 1, enable_checkpointing=False).fit(WrappedInHook(), _data())
    msgs = [r.getMessage() for r in caplog.records if "configure_optimizers" in r.getMessage()]
    assert msgs and "Wrap in __init__" in msgs[0] and "nerofy.param_groups" in msgs[0]


def test_no_warning_when_wrapping_in_init(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        _trainer(tmp_path, 1, enable_checkpointing=False).fit(WrappedInInit(), _data())
    assert not any("configure_optimizers" in r.getMessage() for r in caplog.records)
