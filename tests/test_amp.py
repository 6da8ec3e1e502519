"""Mixed precision (issue item 2 / docs/ecosystem.md "Mixed precision").

* autocast bf16 on CPU trains a wrapped model without NaN; the constraint holds in fp32;
* fp16 autocast + torch.amp.GradScaler (CUDA only: skipped here without a GPU);
* Nero's state stays fp32 whatever the parameter dtype; fp16 / bf16 parameters train.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy
from nerofy.check import constraint_error
from nerofy.rewrite import wrapped_plan


pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(self.ln(F.gelu(self.fc(h))))


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean((1, 2)) > 0).long()
    return x.to(device), y.to(device)


def _states_fp32(opt):
    for st in opt.state.values():
        assert st["v"].dtype == torch.float32
        assert isinstance(st["scale"], float)


def test_bf16_autocast_cpu_trains_without_nan():
    torch.manual_seed(0)
    m, opt = nerofy.wrap(Net())
    x, y = _batch()
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            assert out.dtype == torch.bfloat16
            loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert min(losses[-5:]) < losses[0]
    assert all(p.dtype == torch.float32 for p in m.parameters())  # master weights stay fp32
    _states_fp32(opt)
    assert constraint_error(m, wrapped_plan(m)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_parameters_train_and_state_stays_fp32(dtype):
    torch.manual_seed(0)
    m = Net()
    m, opt = nerofy.wrap(m)
    m.to(dtype)  # parametrizations' originals follow .to(); the optimizer holds the same tensors
    assert all(p.dtype == dtype for p in m.parameters())
    x, y = _batch()
    x = x.to(dtype)
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(torch.isfinite(p).all() and p.dtype == dtype for p in m.parameters())
    assert min(losses[-5:]) < losses[0]
    _states_fp32(opt)
    # the balanced weights are balanced to the dtype's precision
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert constraint_error(m, wrapped_plan(m)) < tol


def test_wrap_a_model_already_in_bf16():
    torch.manual_seed(0)
    m, opt = nerofy.wrap(Net().to(torch.bfloat16))
    x, y = _batch()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x.bfloat16()).float(), y).backward()
        opt.step()
    _states_fp32(opt)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_state_stays_fp32_after_checkpoint_of_a_bf16_model():
    import io

    m, opt = nerofy.wrap(Net().to(torch.bfloat16))
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(m(x.bfloat16()).float(), y).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    m2, opt2 = nerofy.wrap(Net().to(torch.bfloat16))
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _states_fp32(opt2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast + GradScaler needs CUDA")
def test_fp16_autocast_with_grad_scaler_cuda():
    torch.manual_seed(0)
    m, opt = nerofy.wrap(Net())
    m.cuda()  # moves parameters in place (.data), so the optimizer holds the moved tensors
    scaler = torch.amp.GradScaler("cuda")
    x, y = _batch("cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(m(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-5:]) < losses[0]
    _states_fp32(opt)
    assert constraint_error(m, wrapped_plan(m)) < 1e-5


def test_grad_scaler_cpu_skips_inf_steps():
    """GradScaler also exists on CPU (torch>=2.3): an inf gradient makes scaler.step skip Nero's step."""
    torch.manual_seed(0)
    m, opt = nerofy.wrap(Net())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x, y = _batch()
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    loss = F.cross_entropy(m(x), y)
    opt.zero_grad()
    scaler.scale(loss * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 16
    for k, v in m.named_parameters():
        assert torch.equal(v, before[k]), k
    assert all(st.get("step", 0) == 0 for st in opt.state.values())
