"""Signal scale of balanced layers.

Unit-norm neurons change the scale of a layer's output: with fan-in ``n`` and unit-variance
inputs, a unit-norm neuron gives unit-variance pre-activations, where PyTorch's default init gives
about 1/3 of that, and a plain ReLU network then halves the second moment per layer. Networks with
normalisation layers do not care; deep plain ones do. Each balanced layer therefore carries a fixed
gain (``Balanced.scale``, saved in checkpoints, never trained):

* ``"signal"`` — the plan's gain: ``1/rms(phi(z))`` for a layer fed by activation ``phi``, 1
  elsewhere (:mod:`nerofy.gains`; the default);
* ``"unit"`` — the paper's unit norm (gain 1);
* ``"init"`` — each layer keeps the mean neuron norm it had before wrapping (PyTorch's init scale);
* :func:`calibrate_` — a data-calibrated gain from one batch (LSUV-style: each layer's output gets
  unit second moment, layer by layer in forward order).
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from .balanced import Balanced
from .layout import upcast

log = logging.getLogger("nerofy")

SCALE_MODES = ("signal", "unit", "init")


@torch.no_grad()
def init_scale(w: torch.Tensor, layout) -> float:
    """Mean centred neuron norm of ``w`` (the ``"init"`` gain); 1.0 for an all-zero or meta tensor."""
    if w.is_meta:
        return 1.0
    _, norms = layout.project_with_norms(upcast(w.detach()))
    s = float(norms.mean()) if norms is not None and norms.numel() else 0.0
    return s if s > 0 and s == s else 1.0


def balanced_modules(model: nn.Module) -> list[tuple[str, nn.Module, Balanced]]:
    out = []
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for attr, plist in m.parametrizations.items():
                for pz in plist:
                    if isinstance(pz, Balanced):
                        out.append((f"{name}.{attr}" if name else attr, m, pz))
    return out


@torch.no_grad()
def calibrate_(model: nn.Module, inputs: tuple, target: float = 1.0, passes: int = 2) -> dict[str, float]:
    """Set each balanced layer's gain so that its module's output has second moment ``target`` on
    ``inputs``, in forward order (LSUV). Returns name -> gain. The model is run ``passes`` times per
    layer in the worst case; use one small batch. The gain measures the owning module's output, which
    is the weight's own output for Linear/Conv layers and an approximation for modules that use a
    weight inside a larger computation."""
    mods = balanced_modules(model)
    if not mods:
        raise ValueError("calibrate_ needs a model wrapped by nerofy (no balanced layers found)")
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod) if mod not in order else None)
             for _, m, _ in mods]
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    by_module: dict[nn.Module, list] = {}
    for name, m, pz in mods:
        by_module.setdefault(m, []).append((name, pz))
    gains = {}
    for m in order:
        for _ in range(passes):
            seen = {}

            def hook(mod, i, o):
                t = o[0] if isinstance(o, (tuple, list)) else o
                if isinstance(t, torch.Tensor) and t.is_floating_point() and "v" not in seen:
                    seen["v"] = float(t.float().square().mean())

            h = m.register_forward_hook(hook)
            try:
                model(*inputs)
            finally:
                h.remove()
            ms = seen.get("v", 0.0)
            if not ms > 0:
                break
            factor = (target / ms) ** 0.5
            for name, pz in by_module[m]:
                pz.scale *= factor
            if abs(factor - 1) < 0.01:
                break
        for name, pz in by_module[m]:
            gains[name] = float(pz.scale)
    log.info("nerofy.calibrate_: set %d layer gains (min %.3g, max %.3g)", len(gains), min(gains.values()),
             max(gains.values()))
    return gains
