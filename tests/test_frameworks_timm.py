"""timm with a wrapped model (issue 13, item 5): its optimizer factory and its model EMA.

* ``nerofy.register_timm()``: ``create_optimizer_v2(wrapped, "nero")`` gives the same training as
  wrap's own optimizer (timm's weight-decay groups keep each tensor's carried layout); a non-zero
  weight decay is Nero's one clear error;
* ``ModelEmaV2`` / ``ModelEmaV3`` of a wrapped model: the EMA's stored tensors drift off the sphere
  (an average of unit vectors is shorter), but its forward stays exactly balanced, and its
  state_dict saves and loads.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nerofy

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.utils import ModelEmaV2, ModelEmaV3  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _x(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _vit():
    torch.manual_seed(0)  # tokens (cls, positions) that timm keeps out of weight decay: their own groups
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=5,
                             drop_rate=0.0)


def _wrapped(**kw):
    return nerofy.wrap(_vit(), example_inputs=(_x(0)[0],), lr=0.02, **kw)


def _train(m, opt, n=3, ema=None):
    m.train()
    for s in range(n):
        x, y = _x(10 + s)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        if ema is not None:
            ema.update(m)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_timms_factory_builds_nero_that_trains_as_wraps_optimizer():
    from timm.optim import create_optimizer_v2, list_optimizers

    nerofy.register_timm()
    nerofy.register_timm()  # idempotent
    assert "nero" in list_optimizers()
    ref = _train(*_wrapped())
    m, _ = _wrapped()
    # layer decay: timm's per-layer groups (each layout "auto"; the lr_scale is for timm's scheduler)
    opt = create_optimizer_v2(m, "nero", lr=0.02, layer_decay=0.9)
    assert isinstance(opt, nerofy.Nero)
    assert len(opt.param_groups) > 2 and all(g["layout"] == "auto" for g in opt.param_groups)
    got = _train(m, opt)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-6), k


def test_timms_factory_with_weight_decay_is_one_clear_error():
    from timm.optim import create_optimizer_v2

    nerofy.register_timm()
    m, _ = _wrapped()
    with pytest.raises(ValueError, match="weight.decay"):
        create_optimizer_v2(m, "nero", lr=0.02, weight_decay=0.05)


@pytest.mark.parametrize("ema_cls", [ModelEmaV2, ModelEmaV3])
def test_model_ema_of_a_wrapped_model_stays_balanced(ema_cls, tmp_path):
    m, opt = _wrapped()
    ema = ema_cls(m, decay=0.5)
    _train(m, opt, n=4, ema=ema)
    e = ema.module
    assert nerofy.is_wrapped(e)
    plan = nerofy.rewrite.wrapped_plan(e)
    mods = dict(e.named_modules())
    checked = 0
    for entry in plan:
        if not entry.constrained:
            continue
        owner, _, attr = entry.name.rpartition(".")
        mod = mods[owner]
        pz = mod.parametrizations[attr][0]
        lay = entry.layout()
        stored = mod.parametrizations[attr].original
        w = getattr(mod, attr)  # what the EMA's forward uses
        view, dims = lay.neuron_view(w.detach())
        norms = torch.linalg.vector_norm(view, dim=dims)
        assert torch.allclose(norms, torch.full_like(norms, pz.scale), rtol=1e-5), entry.name
        if lay.center:
            assert view.mean(dim=dims).abs().max() < 1e-5, entry.name
        sview, _ = lay.neuron_view(stored.detach())
        checked += int(not torch.allclose(torch.linalg.vector_norm(sview, dim=dims), torch.ones_like(norms), atol=1e-4))
    assert checked > 0  # the averaged stored tensors did drift off the sphere: the check above is not vacuous
    x, _ = _x(50)
    e.eval(), m.eval()
    with torch.no_grad():
        out_e, out_m = e(x), m(x)
    assert torch.isfinite(out_e).all() and not torch.allclose(out_e, out_m, atol=1e-4)
    # the EMA's state_dict is tensors only and loads back (safetensors, as timm's checkpoint saver can write)
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in e.state_dict().items()}, str(tmp_path / "ema.safetensors"))
    fresh, _ = _wrapped()
    fresh.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), out_e)
