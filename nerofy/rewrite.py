"""Apply a plan: balanced parametrizations in place, a matching Nero, and the way back (bake)."""
from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn
from torch.nn.utils import parametrize

from .balanced import GRAD_MODES, Balanced, balance, is_balanced
from .layout import NeuronLayout
from .optim import Nero, check_min_scale
from .plan import Plan, make_plan
from .scale import SCALE_MODES, init_scale

log = logging.getLogger("nerofy")

_PLAN_ATTR = "_nerofy_plan"
_ORDER_ATTR = "_nerofy_param_order"


def _aliases(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) holding each parameter: tied weights have several."""
    out: dict[int, list] = defaultdict(list)
    for m in model.modules():
        for n, p in m._parameters.items():
            if p is not None:
                out[id(p)].append((m, n))
    return out


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(model, _PLAN_ATTR) or any(
        parametrize.is_parametrized(m) and is_balanced(m) for m in model.modules())


def apply_plan(model: nn.Module, plan: Plan, scale: str = "signal", update: str = "paper") -> dict[str, nn.Parameter]:
    """Register the plan's balanced parametrizations in place. Returns name -> the tensor the
    optimizer must update (``parametrizations.<attr>.original`` for constrained ones).

    ``scale``: each balanced tensor's fixed gain: ``"signal"`` (the plan's gains, 1/rms of the
    activation feeding each layer; see nerofy.gains), ``"unit"`` (the paper: gain 1) or ``"init"`` (the mean neuron norm it had before wrapping; see nerofy.scale).
    ``update``: the gradient the stored tensors get, ``"paper"`` or ``"projected"`` (see Balanced)."""
    if scale not in SCALE_MODES:
        raise ValueError(f"unknown scale mode {scale!r}; choose from {', '.join(SCALE_MODES)} "
                         "(or wrap with 'unit' and call nerofy.calibrate_(model, batch))")
    if update not in GRAD_MODES:
        raise ValueError(f"unknown update {update!r}; choose from {', '.join(GRAD_MODES)} ('paper': Nero sees the "
                         "full weight gradient as in the paper; 'projected': the gradient of the stored tensor)")
    params = dict(model.named_parameters())
    missing = [e.name for e in plan if e.name not in params]
    if missing:
        raise ValueError(f"the plan names parameters this model does not have: {missing[:5]}; "
                         "was it made for another model? Build it with nerofy.plan(model).")
    extra = [n for n in params if n not in plan.entries]
    if extra:
        raise ValueError(f"the plan has no entry for {len(extra)} of this model's parameters ({', '.join(extra[:5])}); "
                         "they would be left out of the optimizer. Build the plan with nerofy.plan(model).")
    for e in plan:
        if tuple(params[e.name].shape) != tuple(e.shape):
            raise ValueError(f"{e.name}: plan shape {e.shape} != model shape {tuple(params[e.name].shape)}")
    aliases = _aliases(model)
    # remember each module's parameter order: bake() restores it (optimizers are built by position)
    order = {id(m): (m, list(m._parameters.keys())) for m in model.modules() if m._parameters}
    object.__setattr__(model, _ORDER_ATTR, order)
    targets = {}
    for e in plan:
        p = params[e.name]
        if not e.constrained:
            targets[e.name] = p
            continue
        lay = e.layout()
        gain = init_scale(p, lay) if scale == "init" else e.signal_gain() if scale == "signal" else 1.0
        for mod, attr in aliases[id(p)]:
            balance(mod, attr, lay, gain, update)
        mod, attr = aliases[id(p)][0]
        targets[e.name] = mod.parametrizations[attr].original
    return targets


# unconstrained roles whose step scale is at least this (Nero's min_scale): a gain multiplies a
# signal, so its unit is 1 whatever its init, and a zero- or tiny-initialised gain (zero-init last
# BN, LayerScale at 1e-5) moves at lr per step, not lr * 0.01 or lr * 1e-5. Biases keep the paper's
# scale: at least 1 they measured worse (tiny GPT-2 1.548 vs 1.499, depth-50 MLPs; docs/results.md)
UNIT_STEP_ROLES = {"gain": 1.0}


def wrap(model: nn.Module, lr: float = 0.01, plan: Plan | None = None, example_inputs=None, scale: str = "signal",
         update: str = "paper", **nero_options):
    """Plan (unless given), rewrite ``model`` in place as a balanced network, and return
    ``(model, optimizer)`` with a :class:`Nero` whose param groups match the plan.

    ``scale`` sets the fixed gain of each balanced tensor: ``"signal"`` (default: the plan's gain,
    ``1/rms(phi(z))`` for a layer fed by activation ``phi``, 1 elsewhere; :mod:`nerofy.gains`),
    ``"unit"`` (the paper's unit norm) or ``"init"`` (each layer's initial mean neuron norm).
    ``update``: ``"paper"`` (default: Nero normalises by the full weight gradient and re-projects,
    the paper's update exactly) or ``"projected"`` (by the gradient of the stored tensor, the
    tangent part only); see :class:`nerofy.Balanced`.
    Gains step at ``lr`` times their initial mean magnitude but at least ``lr``
    (``UNIT_STEP_ROLES``, Nero's ``min_scale``): a zero-initialised BN gain would otherwise move
    ``lr * 0.01`` per step, and a LayerScale at 1e-5 never. ``min_scale=`` sets that least scale
    (0: the paper's scale, the initial mean magnitude alone).

    Wrapping an already wrapped model raises ValueError (constraints never stack). Frozen
    parameters are left alone and are not given to the optimizer; unfreezing one later needs a new
    optimizer (or ``optimizer.add_param_group``).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"nerofy.wrap needs a torch.nn.Module, got {type(model).__name__}")
    if is_wrapped(model):
        raise ValueError(f"{type(model).__name__} is already wrapped by nerofy; wrapping twice would stack "
                         "constraints. Use the optimizer you got the first time, or nerofy.bake(model) first.")
    unit = nero_options.pop("min_scale", None)
    if unit is not None:
        check_min_scale(unit)  # before the model is touched
    if plan is None:
        plan = make_plan(model, example_inputs)
    for w in plan.warnings:
        log.warning("nerofy: %s", w)
    targets = apply_plan(model, plan, scale, update)
    groups: dict[tuple, list] = defaultdict(list)
    for e in plan:
        lay = e.layout()
        if lay is None:
            continue
        least = UNIT_STEP_ROLES.get(e.role, 0.0)
        groups[lay, least if unit is None or not least else unit].append(targets[e.name])
    _install_hooks(model)
    object.__setattr__(model, _PLAN_ATTR, plan)
    opt = Nero([{"params": ps, "layout": lay, **({"min_scale": ms} if ms else {})}
                for (lay, ms), ps in groups.items()], lr=lr, **nero_options)
    return model, opt


def _load_plain_weights(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    """Load-state-dict pre-hook: plain ``weight`` keys load into a wrapped model, projected.

    A module-level function bound through ``with_module=True`` (not a closure), so a wrapped model
    deep-copies and pickles cleanly and a copy's hook points at the copy."""
    projected = 0
    for mname, m in module.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr, plist in m.parametrizations.items():
            if not any(isinstance(pz, Balanced) for pz in plist):
                continue
            base = f"{prefix}{mname}." if mname else prefix
            plain, orig = f"{base}{attr}", f"{base}parametrizations.{attr}.original"
            if plain in state_dict and orig not in state_dict:
                w = state_dict.pop(plain)
                with torch.no_grad():
                    for pz in reversed(list(plist)):
                        w = pz.right_inverse(w)
                state_dict[orig] = w
                # a plain checkpoint has no gains: keep the wrapped model's own
                for i, pz in enumerate(plist):
                    key = f"{base}parametrizations.{attr}.{i}._extra_state"
                    if key not in state_dict and hasattr(pz, "get_extra_state"):
                        state_dict[key] = pz.get_extra_state()
                projected += 1
    if projected:
        log.info("nerofy: loaded %d plain weights into a wrapped model; they were projected onto the "
                 "balanced set, which changes the function unless they were balanced already", projected)


def _install_hooks(model: nn.Module) -> None:
    """Let plain checkpoints (``weight`` keys) load into the wrapped model (projected)."""
    model._register_load_state_dict_pre_hook(_load_plain_weights, with_module=True)


def _remove_hooks(model: nn.Module) -> None:
    for k, h in list(model._load_state_dict_pre_hooks.items()):
        if getattr(h, "hook", h) is _load_plain_weights:
            del model._load_state_dict_pre_hooks[k]


def _own_class(m: nn.Module) -> None:
    """Give ``m`` a private copy of its generated parametrized class. copy.deepcopy shares that
    class between the original and the copy, and remove_parametrizations deletes properties from
    it: baking a copy would otherwise break the original."""
    cls = type(m)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    m.__class__ = type(cls.__name__, cls.__bases__, body)


def bake(model: nn.Module) -> nn.Module:
    """Remove nerofy's parametrizations in place, leaving plain parameters (original names and
    order) that hold the balanced weights: the outputs stay identical. Returns the model."""
    done = 0
    baked: dict[int, nn.Parameter] = {}  # original (shared by tied aliases) -> its baked parameter
    owned: set[int] = set()
    for m in model.modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr in list(m.parametrizations.keys()):
            plist = m.parametrizations[attr]
            if not any(isinstance(pz, Balanced) for pz in plist):
                continue
            if id(m) not in owned:
                _own_class(m)
                owned.add(id(m))
            key = id(plist.original)
            if key in baked:
                # a tied alias: share the one baked tensor (projecting again would drift by rounding)
                parametrize.remove_parametrizations(m, attr, leave_parametrized=False)
                setattr(m, attr, baked[key])
            else:
                parametrize.remove_parametrizations(m, attr, leave_parametrized=True)
                baked[key] = m._parameters[attr]
            done += 1
    order = getattr(model, _ORDER_ATTR, {})
    for m, keys in order.values():
        if any(k not in m._parameters for k in keys):
            continue
        items = dict(m._parameters)
        m._parameters.clear()
        for k in keys + [k for k in items if k not in keys]:
            m._parameters[k] = items[k]
    _remove_hooks(model)
    for attr in (_PLAN_ATTR, _ORDER_ATTR):
        if hasattr(model, attr):
            object.__delattr__(model, attr)
    if not done:
        log.info("nerofy.bake: %s had no nerofy parametrizations", type(model).__name__)
    return model


def wrapped_plan(model: nn.Module) -> Plan | None:
    return getattr(model, _PLAN_ATTR, None)


def plan(model: nn.Module, example_inputs=None, frontends=None) -> Plan:
    """The plan for ``model``: every trainable parameter's role, neuron axes, fan-in, centring,
    source op, frontend and reason. For a model wrapped by nerofy, the plan it was wrapped with.

    ``example_inputs`` (a tensor, a tuple of positional inputs, or a dict of keyword inputs such as
    a tokenizer's output) lets the frontends that run the model (shapes for fx, the recorder,
    torch.export) see it; timm models supply their own. ``frontends`` restricts the
    order tried (default: fx, record, export, modules)."""
    stored = wrapped_plan(model) if isinstance(model, nn.Module) else None
    if stored is not None:
        return stored
    return make_plan(model, example_inputs) if frontends is None else make_plan(model, example_inputs, tuple(frontends))


__all__ = ["wrap", "plan", "bake", "apply_plan", "is_wrapped", "wrapped_plan"]
