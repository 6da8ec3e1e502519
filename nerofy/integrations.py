"""Nero in other libraries' optimizer factories. Each import happens on call: nerofy needs torch only.

``register_timm()``: ``timm.optim.create_optimizer_v2(model, "nero", lr=0.01)`` builds Nero. On a
model wrapped by nerofy every tensor carries its layout, so the groups timm builds (split by weight
decay, layer decay) update each tensor as ``nerofy.wrap``'s optimizer does. Nero has no weight
decay: timm's default ``weight_decay=0`` passes, any other value is Nero's one clear error.
"""
from __future__ import annotations

from .optim import Nero

__all__ = ["register_timm"]

TIMM_NAME = "nero"


def register_timm(name: str = TIMM_NAME) -> None:
    """Register Nero in timm's optimizer registry under ``name`` (idempotent)."""
    try:
        from timm.optim import _optim_factory as factory
    except ImportError as e:
        raise ImportError("nerofy.register_timm needs timm (pip install timm)") from e
    registry = getattr(factory, "default_registry", None)
    if registry is None or not hasattr(factory, "OptimInfo"):
        raise RuntimeError("this timm has no optimizer registry (timm >= 1.0.12 has one); build Nero directly: "
                           "nerofy.Nero(nerofy.param_groups(model))")
    if name.lower() in registry._optimizers and registry._optimizers[name.lower()].opt_class is Nero:
        return
    # has_eps=False: timm's eps default is Adam's 1e-8, not Nero's floor of sqrt(v)
    registry.register(factory.OptimInfo(name=name, opt_class=Nero, description="Nero: per-neuron turning "
                                        "(Learning by Turning, ICML 2021), no momentum, no weight decay",
                                        has_eps=False, has_momentum=False, has_betas=False))
