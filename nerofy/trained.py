"""Wrapping trained weights: keep what the model computes, and say where statistics went stale.

The default wrap (``keep="direction"``) projects every neuron onto the balanced set: each neuron
keeps its centred direction and gets the plan's gain, which throws away its trained norm and its
mean (DC) component. That is the paper's start for a fresh network; for trained weights it changes
the function (a BatchNorm CNN on digits: 0.945 -> 0.736 test accuracy at wrap).

``wrap(model, keep="function")`` instead keeps the function exactly (to rounding):

* each neuron's gain is its trained norm (one fixed gain per neuron, saved in checkpoints), so the
  stored direction is ``w / ||w||`` and ``gain * direction`` is ``w`` again;
* the mean constraint is left off where a neuron's mean is more than rounding (the paper's own
  norm-only ablation), since centring would remove it;
* a tensor that is all zero (LoRA's B, a zero-initialised head) cannot be a unit-norm direction
  times a fixed gain and still train, so it is left unconstrained (an elementwise Nero tensor);
* single zero neurons inside a tensor keep gain 0 (their output stays 0, as trained).

Nero then turns each neuron's direction on its sphere as usual. The plan records all of it
(``Entry.kept``, the centring flag, the role, the reason), and the log says what was relaxed.

Projecting trained weights ahead of a BatchNorm changes the scale that layer's running statistics
were measured at: :func:`stale_norm_warning` names that, and :func:`reestimate_bn` re-measures them.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import Tensor, nn

from .layout import NeuronLayout, upcast

__all__ = ["KEEP_MODES", "dense_gain", "keep_function", "neuron_norms", "reestimate_bn", "stale_norm_layers",
           "view_gain"]

log = logging.getLogger("nerofy")

KEEP_MODES = ("direction", "function")

# a neuron whose mean carries more than this share of its norm is not centred (float32 rounding of
# a centred neuron leaves ~1e-7; 1e-5 also passes fp16/bf16 exports of centred weights as centred)
CENTRED_SHARE = 1e-5
ZERO_NORM = 1e-12


def neuron_norms(w: Tensor, layout: NeuronLayout) -> Tensor:
    """Each neuron's norm (centred first when ``layout.center``) in float32 (float64 for float64
    tensors): the per-neuron gain that reproduces ``w``, shaped to broadcast onto ``w`` (see
    :func:`dense_gain`)."""
    view, dims = layout.neuron_view(upcast(w.detach()))
    if layout.center:
        view = view - view.mean(dim=dims, keepdim=True)
    return dense_gain(torch.linalg.vector_norm(view, dim=dims, keepdim=True), layout, tuple(w.shape))


def dense_gain(g: Tensor, layout: NeuronLayout, shape: tuple[int, ...]) -> Tensor:
    """One gain per neuron, from a keepdim reduction over ``layout.neuron_view`` to the form that
    broadcasts onto the weight itself (size 1 on fan-in axes; a grouped layout's split axis at full
    size, each group's value repeated), which is how checkpoints store it: a reader without the
    layout can still multiply it in."""
    if layout.groups == 1:
        return g
    sa = layout.split_axis % len(shape)
    g = g.expand(*g.shape[:sa + 1], shape[sa] // layout.groups, *g.shape[sa + 2:])
    return g.flatten(sa, sa + 1).contiguous()


def view_gain(g: Tensor, layout: NeuronLayout) -> Tensor:
    """:func:`dense_gain`'s inverse: the per-neuron gain as a keepdim tensor over the neuron view."""
    if layout.groups == 1:
        return g
    sa = layout.split_axis % g.dim()
    return g.unflatten(sa, (layout.groups, g.shape[sa] // layout.groups)).amax(dim=sa + 1, keepdim=True)


def _mean_share(w: Tensor, layout: NeuronLayout) -> float:
    """The largest share of a neuron's norm that its mean carries: |mean| * sqrt(fan-in) / norm."""
    view, dims = layout.neuron_view(upcast(w.detach()))
    norms = torch.linalg.vector_norm(view, dim=dims, keepdim=True)
    mean = view.mean(dim=dims, keepdim=True)
    share = mean.abs() * layout.fan_in(w.shape) ** 0.5 / norms.clamp_min(ZERO_NORM)
    return float(share.max()) if share.numel() else 0.0


@torch.no_grad()
def keep_function(plan, params: dict[str, Tensor]) -> list[str]:
    """Adjust ``plan`` in place so that wrapping keeps the function of ``params`` (trained weights).

    Every constrained entry gets ``kept=True`` (per-neuron gains from its norms at wrap time),
    centring off where a neuron's mean is more than rounding, and an all-zero tensor becomes
    unconstrained. Returns the log lines saying what was relaxed."""
    uncentred, zero_tensors, zero_neurons = [], [], 0
    for e in plan:
        if not e.constrained:
            continue
        p = params[e.name]
        if p.is_meta:
            raise ValueError(f"keep='function' keeps trained values, but {e.name} is on the meta device (no values); "
                             "load the weights first (model.to_empty(device=...) then load_state_dict)")
        lay = e.layout()
        norms = neuron_norms(p, lay.with_(center=False))
        if not bool((norms > ZERO_NORM).any()):
            zero_tensors.append(e.name)
            if e.role == "neuron":
                e.role, e.axes, e.split_axis, e.groups = "free", None, None, 1
            e.balanced = False
            e.reason += ("; keep='function': all zero in the trained weights, and a fixed gain times a unit-norm "
                         "direction cannot start at zero and still train: left unconstrained (elementwise Nero)")
            continue
        share = _mean_share(p, lay) if lay.center else 0.0
        if share > CENTRED_SHARE:
            e.center = False
            uncentred.append(e.name)
        zero_neurons += int((norms <= ZERO_NORM).sum())
        e.kept = True
        e.reason += ("; keep='function': each neuron's gain is its trained norm"
                     + (f", not centred (a neuron's mean carried {share:.2g} of its norm; centring would "
                        "change the function)" if e.name in uncentred else ""))
    lines = []
    kept = sum(e.kept for e in plan)
    if kept:
        lines.append(f"keep='function': {kept} balanced tensors keep each neuron's trained norm as a fixed gain "
                     f"(Nero turns their directions)")
    if uncentred:
        lines.append(f"keep='function': {len(uncentred)} tensors are normalised without centring (their trained "
                     f"neurons have a mean component; centring would remove it): {_names(uncentred)}")
    if zero_tensors:
        lines.append(f"keep='function': {len(zero_tensors)} all-zero tensors are left unconstrained so they "
                     f"can move from zero: {_names(zero_tensors)}")
    if zero_neurons:
        lines.append(f"keep='function': {zero_neurons} neurons are zero in the trained weights; they keep gain 0 "
                     "(their output stays 0)")
    return lines


def _names(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---- normalisation statistics -------------------------------------------------------------------
def _tracked_bn(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm-style layers whose running statistics were measured (trained, not at init)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats \
                and m.num_batches_tracked is not None and int(m.num_batches_tracked) > 0:
            out.append((name, m))
    return out


def stale_norm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers of ``model`` that hold running statistics from training."""
    return [n for n, _ in _tracked_bn(model)]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Re-measure the running statistics of every BatchNorm layer of ``model`` on ``batches``
    (each a tensor, a tuple of positional inputs, or a dict of keyword inputs; a few batches of
    training data), as a cumulative average, and put the model back in the mode it was in.
    Returns how many batches were used. Use it after a conversion that changed the scale of the
    layers ahead of a BatchNorm (``wrap`` with the default ``keep="direction"`` on trained weights)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if not bns:
        raise ValueError("reestimate_bn: the model has no BatchNorm layer with running statistics")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches, whatever their number
        model.train()
        for b in batches:
            if max_batches is not None and n >= max_batches:
                break
            if isinstance(b, dict):
                model(**b)
            elif isinstance(b, (tuple, list)):
                model(*b)
            else:
                model(b)
            n += 1
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, t in modes.items():
            m.train(t)
    if not n:
        raise ValueError("reestimate_bn: no batches were given")
    log.info("nerofy: re-estimated the running statistics of %d BatchNorm layers on %d batches", len(bns), n)
    return n
