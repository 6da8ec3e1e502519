"""Apply a plan: balanced parametrizations in place, a matching Nero, and the way back (bake)."""
from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
import logging
import types
from collections import defaultdict

import torch
from torch import nn
from torch.nn.utils import parametrize

from .balanced import GRAD_MODES, Balanced, balance, is_balanced
from .export import load_plain_weights, route_save_pretrained, unroute_save_pretrained
from .layout import NeuronLayout
from .optim import CARRIED_CLIP, CARRIED_LAYOUT, CARRIED_MIN_SCALE, Nero, check_min_scale
from .plan import CHAIN_REF, Plan, chain_factor, make_plan
from .scale import SCALE_MODES, init_scale
from .trained import KEEP_MODES, keep_function, neuron_norms, stale_norm_layers

log = logging.getLogger("nerofy")

_PLAN_ATTR = "_nerofy_plan"
_ORDER_ATTR = "_nerofy_param_order"
_OPTS_ATTR = "_nerofy_options"


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
        gain = _gain(e, p, lay, scale)
        for mod, attr in aliases[id(p)]:
            balance(mod, attr, lay, gain, update)
        mod, attr = aliases[id(p)][0]
        targets[e.name] = mod.parametrizations[attr].original
    return targets


def _gain(e, p: torch.Tensor, lay: NeuronLayout, scale: str):
    """The fixed gain ``apply_plan`` gives a constrained tensor: per neuron for a kept entry."""
    if e.kept:
        return neuron_norms(p, lay)
    return init_scale(p, lay) if scale == "init" else e.signal_gain() if scale == "signal" else 1.0


# unconstrained roles whose step scale is at least this (Nero's min_scale): a gain multiplies a
# signal, so its unit is 1 whatever its init, and a zero- or tiny-initialised gain (zero-init last
# BN, LayerScale at 1e-5) moves at lr per step, not lr * 0.01 or lr * 1e-5. Biases keep the paper's
# scale: at least 1 they measured worse (tiny GPT-2 1.548 vs 1.499, depth-50 MLPs; docs/results.md)
UNIT_STEP_ROLES = {"gain": 1.0}


def wrap(model: nn.Module, lr: float | dict[str, float] = 0.01, plan: Plan | None = None, example_inputs=None, scale: str = "signal",
         update: str = "paper", keep: str = "direction", chain_ref: int | None = CHAIN_REF, **nero_options):
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

    ``keep``: ``"direction"`` (default: each neuron keeps its centred direction and gets the gain
    above, the paper's start; trained weights change their function) or ``"function"`` (for trained
    weights: each neuron keeps its trained norm as a fixed gain and is left uncentred where its
    mean is more than rounding, so the wrapped model computes what the trained one did; see
    :mod:`nerofy.trained`). ``scale`` does not apply with ``"function"``.

    ``chain_ref``: a network whose longest chain of weighted layers in series (``plan.chain``: a
    layer adds one, a residual sum or gate takes the shortest path) is ``L > chain_ref`` layers gets
    Nero's cap on a step (``clip``, 2 lr by default) times ``chain_ref / L``: a step turns every
    layer of the chain, so the chain's function turns by about the sum of their angles (a 50-layer
    plain MLP: each neuron at most ``0.48 lr``; residual nets and transformers have chains of 3-8
    and keep the cap). ``None``: no such factor. The factor is carried by the tensors like their
    layouts, so any Nero built over them applies it.

    ``lr``: the angle per step, or a dict of parameter-name patterns (fnmatch over the plan's names,
    first match wins) to learning rates, ``"*"`` the default: ``lr={"lm_head.*": 1e-3, "*": 0.01}``.

    Every tensor the optimizer updates carries its layout and least step scale, so a Nero built
    another way (``Nero(model.parameters())``, torch-style groups, ``add_param_group``, an optimizer
    factory) updates it as this one does; :func:`param_groups` gives wrap's groups again.

    Wrapping an already wrapped model raises ValueError (constraints never stack). Frozen
    parameters are left alone and are not given to the optimizer; unfreezing one later needs a new
    optimizer (or ``optimizer.add_param_group``).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"nerofy.wrap needs a torch.nn.Module, got {type(model).__name__}")
    if is_wrapped(model):
        raise ValueError(f"{type(model).__name__} is already wrapped by nerofy; wrapping twice would stack "
                         "constraints. Use the optimizer you got the first time (or nerofy.Nero(nerofy.param_groups("
                         "model))), or nerofy.bake(model) first. In a framework hook that runs on every fit "
                         "(Lightning's configure_optimizers), wrap once in __init__ instead.")
    if keep not in KEEP_MODES:
        raise ValueError(f"unknown keep mode {keep!r}; choose from {', '.join(KEEP_MODES)} ('function' keeps a "
                         "trained model's outputs: each neuron keeps its norm as its gain)")
    if keep == "function" and scale != "signal":
        raise ValueError(f"keep='function' gives each neuron its trained norm as gain; scale={scale!r} does not "
                         "apply with it (leave scale at its default)")
    unit = nero_options.pop("min_scale", None)
    if unit is not None:
        check_min_scale(unit)  # before the model is touched
    if chain_ref is not None and not (isinstance(chain_ref, int) and not isinstance(chain_ref, bool) and chain_ref >= 1):
        raise ValueError(f"chain_ref must be a whole number of layers >= 1 (default {CHAIN_REF}) or None (no cap factor "
                         f"for long chains), got {chain_ref!r}")
    lrs = _check_lr(lr)
    if plan is None:
        plan = make_plan(model, example_inputs)
    params = dict(model.named_parameters())
    if keep == "function":
        plan = copy.deepcopy(plan)  # the caller's plan stays as it was; the model's records what was done
        plan.warnings.extend(keep_function(plan, params))
    else:
        _warn_stale_norms(model, plan, params, scale)
    for w in plan.warnings:
        log.warning("nerofy: %s", w)
    if isinstance(lrs, dict):
        _match_lr(lrs, _names(model, plan))  # a pattern matching nothing fails before the rewrite
    _warn_if_in_lightning_hook(model)
    targets = apply_plan(model, plan, scale, update)
    factor = chain_factor(plan.chain, chain_ref)
    if factor < 1:
        log.info("nerofy: %d weighted layers in series (over %d): Nero's cap on a step is its clip x %.3g",
                 plan.chain, chain_ref, factor)
    for e in plan:
        lay = e.layout()
        if lay is not None:
            # the tensor carries its layout, least step scale and cap factor: Nero groups built the
            # torch way (model.parameters(), [{"params": head.parameters(), "lr": ...}],
            # add_param_group, an optimizer factory) then treat it as wrap's optimizer does
            _carry(targets[e.name], lay, _least_scale(e.role, unit), factor)
    _install_hooks(model)
    object.__setattr__(model, _PLAN_ATTR, plan)
    object.__setattr__(model, _OPTS_ATTR, {"lr": lrs, "min_scale": unit, "chain_ref": chain_ref})
    opt = Nero(param_groups(model), lr=lrs if not isinstance(lrs, dict) else lrs.get("*", DEFAULT_LR), **nero_options)
    return model, opt


DEFAULT_LR = 0.01


def _warn_stale_norms(model: nn.Module, plan: Plan, params: dict, scale: str) -> None:
    """Warn when BatchNorm layers hold running statistics from training and the rewrite is about
    to change trained weights (projection, another gain): in eval mode those statistics are stale."""
    stale = stale_norm_layers(model)
    if not stale:
        return
    from .export import balanced_gain

    changed = 0
    for e in plan:
        if not e.constrained or e.name not in params:
            continue
        p, lay = params[e.name], e.layout()
        s, g = balanced_gain(p, lay), _gain(e, p, lay, scale)
        changed += s is None or abs(s - float(g)) > 1e-4 * max(abs(float(g)), 1e-12)
    if changed:
        log.warning("nerofy: %d BatchNorm layers (%s) hold running statistics from training, and wrapping changes "
                    "%d trained weight tensors (each neuron projected onto the balanced set): in eval mode those "
                    "statistics no longer fit. Re-estimate them with nerofy.reestimate_bn(model, batches), or wrap "
                    "with keep='function' to keep the trained function.", len(stale),
                    ", ".join(stale[:3]) + (" ..." if len(stale) > 3 else ""), changed)


def _least_scale(role: str, unit: float | None) -> float:
    least = UNIT_STEP_ROLES.get(role, 0.0)
    return least if unit is None or not least else unit


def _carry(t: torch.Tensor, lay: NeuronLayout, least: float, clip_factor: float) -> None:
    setattr(t, CARRIED_LAYOUT, lay)  # read by Nero's "auto" groups (optim._layout_of, _init_state)
    setattr(t, CARRIED_MIN_SCALE, least)
    setattr(t, CARRIED_CLIP, clip_factor)  # read by every group (optim.clip_inv)


def _check_lr(lr):
    if isinstance(lr, dict):
        if not lr:
            raise ValueError("wrap(lr={}) names no learning rate: give a float, or {'pattern': lr, ..., '*': default}")
        for k, v in lr.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"wrap(lr=...) maps parameter-name patterns (fnmatch, e.g. 'lm_head.*') to learning "
                                 f"rates >= 0; got {k!r}: {v!r}")
        return dict(lr)
    return lr


def _plain_name(n: str) -> str:
    return n.replace(".parametrizations.", ".").removeprefix("parametrizations.").removesuffix(".original")


def _names(model: nn.Module, plan: Plan) -> dict[str, list[str]]:
    """Each trainable plan entry's name and the names of its tied aliases (``lm_head.weight`` for
    GPT-2's token table), plain either way: lr patterns may name any of them."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(_plain_name(n))
    params = {_plain_name(n): p for n, p in model.named_parameters()}
    return {e.name: by_id.get(id(params.get(e.name)), [e.name]) for e in plan if e.layout() is not None}


def _match_lr(lrs: dict, names: dict[str, list[str]]) -> dict[str, float]:
    """entry -> lr for every entry a pattern of ``lrs`` matches under one of its names (the first
    matching pattern wins, '*' is the default). A pattern that matches nothing is an error (a typo
    would silently do nothing)."""
    out, used = {}, set()
    pats = [k for k in lrs if k != "*"]
    for entry, aliases in names.items():
        for k in pats:
            if any(fnmatch.fnmatchcase(n, k) for n in aliases):
                out[entry] = float(lrs[k])
                used.add(k)
                break
    unused = [k for k in pats if k not in used]
    if unused:
        every = [n for a in names.values() for n in a]
        close = difflib.get_close_matches(unused[0], every, n=3, cutoff=0.3)
        raise ValueError(f"wrap(lr=...): the pattern {unused[0]!r} matches no trainable parameter (patterns are fnmatch "
                         "globs over parameter names such as 'lm_head.*' or '*.attn.*')"
                         + (f"; close names: {', '.join(close)}" if close else ""))
    return out


def _optimizer_tensors(model: nn.Module, plan: Plan):
    """(plan entry, the tensor the optimizer updates) for every entry with a layout."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for e in plan:
        if e.layout() is None:
            continue
        mod, _, attr = e.name.rpartition(".")
        t = params.get(f"{mod + '.' if mod else ''}parametrizations.{attr}.original") if e.constrained else None
        t = t if t is not None else params.get(e.name)
        if t is None:
            raise ValueError(f"{e.name} of the plan is not a parameter of the model any more; was the model changed "
                             "after wrapping?")
        yield e, t


def _deepcopy_wrapped(self, memo):
    """``copy.deepcopy`` of a wrapped model (an instance attribute, so the class is untouched):
    nn.Parameter's deepcopy drops tensor attributes, so the copy's tensors get their carried
    layouts again (timm's ModelEma, a copy trained with ``Nero(copy.parameters())``)."""
    fn = self.__dict__.pop("__deepcopy__")
    try:
        new = copy.deepcopy(self, memo)
    finally:
        self.__dict__["__deepcopy__"] = fn
    plan = wrapped_plan(new)
    if plan is not None:
        opts = getattr(new, _OPTS_ATTR, {})
        unit, factor = opts.get("min_scale"), chain_factor(plan.chain, opts.get("chain_ref", CHAIN_REF))
        for e, t in _optimizer_tensors(new, plan):
            _carry(t, e.layout(), _least_scale(e.role, unit), factor)
        new.__dict__["__deepcopy__"] = types.MethodType(_deepcopy_wrapped, new)
    return new


def param_groups(model: nn.Module, lr=None, min_scale: float | None = None) -> list[dict]:
    """Nero's param groups for a model wrapped by nerofy: one per (layout, least step scale, lr),
    as ``wrap`` builds them, from the model as it is now. Use it to build Nero again where the
    parameters were replaced (after FSDP2's ``fully_shard``, on a deep copy) or in a framework hook
    (Lightning's ``configure_optimizers``): ``Nero(nerofy.param_groups(model))``.

    ``lr`` / ``min_scale``: as in ``wrap`` (default: what ``wrap`` was given). A group gets an
    ``lr`` key only where a pattern of ``lr={...}`` set one."""
    plan = wrapped_plan(model)
    if plan is None:
        raise ValueError(f"{type(model).__name__} is not wrapped by nerofy: call nerofy.wrap(model) first "
                         "(it returns the optimizer too)")
    opts = getattr(model, _OPTS_ATTR, {})
    lrs = _check_lr(opts.get("lr") if lr is None else lr)
    unit = opts.get("min_scale") if min_scale is None else min_scale
    if unit is not None:
        check_min_scale(unit)
    by_name = _match_lr(lrs, _names(model, plan)) if isinstance(lrs, dict) else {}
    groups: dict[tuple, list] = defaultdict(list)
    for e, t in _optimizer_tensors(model, plan):
        if t.requires_grad:
            groups[e.layout(), _least_scale(e.role, unit), by_name.get(e.name)].append(t)
    return [{"params": ps, "layout": lay, **({"min_scale": ms} if ms else {}), **({"lr": g_lr} if g_lr is not None else {})}
            for (lay, ms, g_lr), ps in groups.items()]


def _warn_if_in_lightning_hook(model: nn.Module) -> None:
    """Lightning restores a checkpoint's weights before it calls ``configure_optimizers``: a model
    wrapped there cannot resume (the plain model meets the wrapped keys) nor fit twice."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "configure_optimizers" else None
        if (isinstance(owner, nn.Module) and getattr(owner, "_trainer", None) is not None
                and any(m is model for m in owner.modules())):  # the LightningModule or a part of it
            log.warning("nerofy: wrap() inside a LightningModule's configure_optimizers: Lightning loads checkpoints "
                        "before it calls that hook, so resuming this run will fail on the wrapped keys, and a second "
                        "fit() would wrap twice. Wrap in __init__ and return nerofy.Nero(nerofy.param_groups(self)) "
                        "from configure_optimizers (docs/frameworks.md, Lightning).")
            return
        frame = frame.f_back


def _install_hooks(model: nn.Module) -> None:
    """Let plain checkpoints (``weight`` keys) load into the wrapped model (nerofy.export), and
    ``save_pretrained`` write the plain export."""
    model._register_load_state_dict_pre_hook(load_plain_weights, with_module=True)
    route_save_pretrained(model)
    model.__dict__["__deepcopy__"] = types.MethodType(_deepcopy_wrapped, model)


def _remove_hooks(model: nn.Module) -> None:
    for k, h in list(model._load_state_dict_pre_hooks.items()):
        if getattr(h, "hook", h) is load_plain_weights:
            del model._load_state_dict_pre_hooks[k]
    unroute_save_pretrained(model)
    model.__dict__.pop("__deepcopy__", None)


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
    for attr in (_PLAN_ATTR, _ORDER_ATTR, _OPTS_ATTR):
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


__all__ = ["wrap", "plan", "bake", "apply_plan", "is_wrapped", "wrapped_plan", "param_groups"]
