"""Plain exports of wrapped models, and loading them (or any plain checkpoint) back.

A wrapped model's own ``state_dict`` holds what Nero trains: the stored unit-norm tensors
(``<module>.parametrizations.<name>.original``) and each balanced layer's gain (``...<i>._extra_state``,
a 0-dim tensor). That round-trips bit-exactly, but the plain architecture cannot load it.

:func:`export_state_dict` gives the *plain* form: each balanced weight as the network uses it
(``gain * normalize(center(V))``) under its original name, tied weights as one tensor, nothing else
changed. The plain architecture loads it to the same function (HF ``from_pretrained``, timm,
``load_state_dict``), and so does a wrapped model: a plain weight that is already balanced (every
neuron centred, all of the same norm ``s``) loads as that direction with gain ``s``, so nothing is
lost; any other plain weight is projected and keeps the wrapped model's gain (logged).
``wrap`` routes ``save_pretrained`` of Hugging Face, peft and diffusers models through the export.
"""
from __future__ import annotations

import logging
import types

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .balanced import Balanced, gain_from_state
from .layout import NeuronLayout, _acc
from .trained import _mean_share, neuron_norms

__all__ = ["export_state_dict", "balanced_gain"]

log = logging.getLogger("nerofy")

_SAVE_ATTR = "save_pretrained"


def _balanced_lists(model: nn.Module):
    """(module name, module, attribute, its ParametrizationList) for every balanced tensor."""
    for mname, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr, plist in m.parametrizations.items():
            if any(isinstance(pz, Balanced) for pz in plist):
                yield mname, m, attr, plist


def _key(mname: str, rest: str) -> str:
    return f"{mname}.{rest}" if mname else rest


@torch.no_grad()
def export_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict:
    """The plain state_dict of a wrapped ``model``: balanced weights as used, under original names.

    ``state_dict``: a wrapped state_dict to convert (e.g. one gathered by FSDP or handed over by a
    framework); default ``model.state_dict()``. Tied weights come out as one tensor under each of
    their names (as a plain model's state_dict has them), so frameworks that drop tied copies
    (HF ``save_pretrained``, accelerate, safetensors' ``save_model``) recognise them. Keys of the
    model's other tensors pass through unchanged. A model without nerofy's parametrizations gets
    its state_dict back as it is.
    """
    sd = model.state_dict() if state_dict is None else dict(state_dict)
    done: dict[tuple, Tensor] = {}  # (storage, shape, gain) -> the plain tensor, so tied aliases share it
    renames: dict[str, tuple[str, Tensor]] = {}
    for mname, _, attr, plist in _balanced_lists(model):
        base = _key(mname, f"parametrizations.{attr}")
        okey = f"{base}.original"
        if okey not in sd:
            continue
        v = sd[okey]
        w = v
        gains = []
        for i, pz in enumerate(plist):
            skey = f"{base}.{i}._extra_state"
            if isinstance(pz, Balanced):
                if skey not in sd:
                    raise ValueError(f"cannot export {okey}: its gain {skey} is missing from the state_dict")
                gains.append(gain_from_state(sd[skey]))
                g_key = gains[-1] if not isinstance(gains[-1], Tensor) else id(sd[skey])  # per-neuron: by object
                w_key = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), g_key, i)
                if w_key not in done:
                    done[w_key] = Balanced(pz.layout, gains[-1], pz.grad)(w.detach())
                w = done[w_key]
            else:  # a parametrization of the user's own under ours: apply it as the model would
                w = pz(w)
        renames[okey] = (_key(mname, attr), w)
    out = {}
    for k, v in sd.items():
        if k in renames:
            name, w = renames[k]
            out[name] = w
        elif _is_balanced_state(k, renames):
            continue
        else:
            out[k] = v
    return out


def _is_balanced_state(key: str, renames: dict) -> bool:
    """Whether ``key`` is the extra state of a parametrization whose tensor was exported."""
    if not key.endswith("._extra_state"):
        return False
    base = key[: -len("._extra_state")].rsplit(".", 1)[0]
    return f"{base}.original" in renames


def balanced_gain(w: Tensor, layout: NeuronLayout, rtol: float | None = None) -> float | None:
    """``s`` if every neuron of ``w`` is centred (when ``layout.center``) and of norm ``s``
    (to ``rtol``: default 1e-4, or 16 ulps of a low-precision dtype), else None. Such a weight is
    exactly ``s * project(w)``: loading it as direction + gain ``s`` keeps the function."""
    if w.is_meta or w.numel() == 0:
        return None
    if rtol is None:
        rtol = max(1e-4, 16 * torch.finfo(w.dtype).eps) if w.is_floating_point() else 1e-4
    view, dims = layout.neuron_view(w.detach().to(_acc(w.dtype)))
    norms = torch.linalg.vector_norm(view, dim=dims)
    s = norms.mean()
    if not torch.isfinite(s) or s <= 0:
        return None
    if layout.center:
        fan_in = max(1, layout.fan_in(w.shape))
        mean = view.mean(dim=dims)
        # a centred neuron's mean is rounding: |mean| * sqrt(fan_in) is its share of the norm
        if bool((mean.abs() * fan_in ** 0.5 > rtol * s).any()):
            return None
    if bool(((norms - s).abs() > rtol * s).any()):
        return None
    return float(s)


def per_neuron_gain(w: Tensor, layout: NeuronLayout, rtol: float = 1e-5) -> Tensor | None:
    """Each neuron's norm (as :func:`nerofy.trained.neuron_norms`) if ``w`` respects ``layout``'s centring
    (to ``rtol`` of each norm), else None: for a layer with one gain per neuron
    (``wrap(keep="function")``), loading ``w`` as directions + these gains keeps it exactly."""
    if w.is_meta or w.numel() == 0:
        return None
    if layout.center and _mean_share(w, layout) > max(rtol, 16 * torch.finfo(w.dtype).eps):
        return None
    return neuron_norms(w, layout)


@torch.no_grad()
def load_plain_weights(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """Load-state-dict pre-hook of a wrapped model: plain ``weight`` keys load into it.

    A plain weight that is balanced already (a nerofy export: every neuron centred, one common norm
    ``s``) loads exactly, as its direction with gain ``s``; into a layer with one gain per neuron
    (``keep="function"``) any weight that respects its centring loads exactly, each neuron's norm
    becoming its gain. Any other is projected onto the balanced
    set and keeps this model's gain, which changes the function (logged). Tied aliases a plain
    checkpoint left out (HF drops ``lm_head.weight``) are filled from the tensor they share. A
    wrapped tensor without its gain is an error, also under ``strict=False``.

    A module-level function bound through ``with_module=True`` (not a closure), so a wrapped model
    deep-copies and pickles cleanly and a copy's hook points at the copy."""
    exact, projected = 0, 0
    loaded: dict[int, tuple[Tensor, list]] = {}  # id(original) -> (stored tensor, extra states)
    lists = list(_balanced_lists(module))
    for mname, m, attr, plist in lists:
        base = f"{prefix}{_key(mname, '')}"
        plain, orig = f"{base}{attr}", f"{base}parametrizations.{attr}.original"
        states = [f"{base}parametrizations.{attr}.{i}._extra_state" for i in range(len(plist))]
        if orig in state_dict:
            missing = [s for s, pz in zip(states, plist) if isinstance(pz, Balanced) and s not in state_dict]
            if missing:
                error_msgs.append(
                    f"{missing[0]} (the gain of balanced weight {orig}) is missing from the state_dict: the weight "
                    "would load with another gain and change the function. Save the whole state_dict (every "
                    "entry is a tensor), or save a plain export (nerofy.export_state_dict(model)) instead.")
            continue
        if plain not in state_dict:
            continue
        w = state_dict.pop(plain)
        extra = []
        for pz in reversed(list(plist)):
            if isinstance(pz, Balanced):
                s = per_neuron_gain(w, pz.layout) if pz.per_neuron else balanced_gain(w, pz.layout)
                extra.append(pz.get_extra_state() if s is None else
                             s.to(torch.float64) if isinstance(s, Tensor) else torch.tensor(s, dtype=torch.float64))
                exact, projected = (exact + 1, projected) if s is not None else (exact, projected + 1)
            else:
                extra.append(pz.get_extra_state() if hasattr(pz, "get_extra_state") else None)
            w = pz.right_inverse(w)
        extra.reverse()
        state_dict[orig] = w
        for s, e in zip(states, extra):
            if e is not None:
                state_dict[s] = e
        loaded[id(plist.original)] = (w, extra)
    # tied aliases a plain checkpoint named once (HF's export drops lm_head.weight; the tensor is one
    # parameter here). Wrapped keys are left as torch leaves them: a wrapped checkpoint without a
    # tied copy reports it missing, as safetensors' load_model (accelerate) expects of tied tensors
    for mname, m, attr, plist in lists:
        base = f"{prefix}{_key(mname, '')}"
        orig = f"{base}parametrizations.{attr}.original"
        got = loaded.get(id(plist.original))
        if got is None or orig in state_dict or f"{base}{attr}" in state_dict:
            continue
        state_dict[orig] = got[0]
        for i, e in enumerate(got[1]):
            if e is not None:
                state_dict.setdefault(f"{base}parametrizations.{attr}.{i}._extra_state", e)
    if exact:
        log.info("nerofy: loaded %d plain weights that were balanced already (a nerofy export) exactly, each as "
                 "its direction and gain", exact)
    if projected:
        log.info("nerofy: loaded %d plain weights into a wrapped model; they were projected onto the "
                 "balanced set, which changes the function unless they were balanced already", projected)


# ---- save_pretrained (Hugging Face, peft, diffusers) writes the plain export --------------------
def _save_pretrained_plain(self, save_directory, *args, state_dict=None, **kwargs):
    """``save_pretrained`` of a wrapped model: the plain export (see nerofy.export), which the plain
    architecture's ``from_pretrained`` loads to the same function and ``nerofy.wrap`` wraps again."""
    return type(self).save_pretrained(self, save_directory, *args, state_dict=export_state_dict(self, state_dict),
                                      **kwargs)


def route_save_pretrained(model: nn.Module) -> bool:
    """Make ``model.save_pretrained`` write the plain export, if the model has one (an instance
    attribute: the class and every other instance stay as they were). Returns whether it did."""
    if not callable(getattr(type(model), _SAVE_ATTR, None)):
        return False
    object.__setattr__(model, _SAVE_ATTR, types.MethodType(_save_pretrained_plain, model))
    return True


def unroute_save_pretrained(model: nn.Module) -> None:
    if isinstance(model.__dict__.get(_SAVE_ATTR), types.MethodType):
        object.__delattr__(model, _SAVE_ATTR)
