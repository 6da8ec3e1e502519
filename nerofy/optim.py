"""Nero: the neuronal rotator (Liu, Bernstein, Meister & Yue, "Learning by Turning", ICML 2021).

Written from the paper's mathematics (see DESIGN.md §1). For every neuron ``i`` of a parameter
(its layout says which slices are neurons) with gradient ``g_i`` at the parameter's step ``t``::

    v_i  <- beta * v_i + (1 - beta) * ||g_i||^2              # one fp32 scalar per neuron
    w_i  <- w_i - lr * s * g_i / sqrt(v_i / (1 - beta^t))     # ||step|| ~ lr * s
    w_i  <- (w_i - mean(w_i)) / ||w_i - mean(w_i)||             # constrained layouts only

For balanced (unit-norm) neurons ``s = 1``, so the learning rate is the angle each neuron turns per
step. Two departures, both switchable (``clip=None`` is the paper's update): a step turns a
neuron by at most ``clip * lr`` (``||g_i|| / sqrt(v_hat_i)`` capped at ``clip``), and ``v_i`` takes
the gradient clipped the same way (``min(||g_i||^2, max(clip, 1)^2 * v_hat_i)``, ``clip_v``), so a spike
neither turns a neuron far nor shrinks its later steps. Unconstrained tensors (biases, gains, embedding rows, ...) use the same rule with ``s`` fixed
at the tensor's mean neuron norm when its state is created (``scale_floor`` where that is zero), so
they too move by a relative amount.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import _triton  # imports triton itself only on a step that uses it
from .layout import ELEMENTWISE, ROWS, NeuronLayout

__all__ = ["Nero", "nero_update"]

log = logging.getLogger("nerofy")

_LOW_PRECISION = (torch.float16, torch.bfloat16)
DEFAULT_CLIP = 2.0  # Nero's default cap on a step, in units of lr (see Nero's clip)


# ---------------------------------------------------------------------------------------------
# layouts per parameter
# ---------------------------------------------------------------------------------------------
def _parse_layout(spec: Any) -> NeuronLayout | str:
    """Accept the group's ``layout`` as "auto", "elementwise", a NeuronLayout or its dict form."""
    if isinstance(spec, NeuronLayout) or spec == "auto":
        return spec
    if spec in ("elementwise", None):
        return ELEMENTWISE
    if isinstance(spec, dict):
        d = dict(spec)
        if d.get("axes") is not None:
            d["axes"] = tuple(d["axes"])
        return NeuronLayout(**d)
    raise ValueError(f"layout must be 'auto', 'elementwise' or a NeuronLayout, got {spec!r}")


def _layout_to_dict(spec: NeuronLayout | str) -> dict | str:
    if isinstance(spec, NeuronLayout):
        return {
            "axes": None if spec.axes is None else list(spec.axes),
            "split_axis": spec.split_axis,
            "groups": spec.groups,
            "center": spec.center,
            "normalize": spec.normalize,
        }
    return spec


@lru_cache(maxsize=4096)
def _resolve(spec: NeuronLayout | str, shape: tuple[int, ...]) -> NeuronLayout:
    """The layout one parameter of ``shape`` actually gets in a group whose layout is ``spec``."""
    if spec == "auto":
        # The paper's convention: every dim>1 tensor is a neuron weight along axis 0.
        if len(shape) > 1 and ROWS.fan_in(shape) > 1:
            return ROWS
        return ELEMENTWISE
    spec.check(shape)
    if spec.constrained and not spec.elementwise and spec.fan_in(shape) <= 1:
        log.warning(
            "Nero: a tensor of shape %s has fan-in 1 under layout %s; a balanced fan-in-1 neuron "
            "could only be +-1 (or 0 once centred), so it is updated per element as a gain instead.",
            shape, spec.describe(),
        )
        return ELEMENTWISE
    return spec


# what nerofy.wrap puts on each tensor it hands Nero: its layout and least step scale, so that
# groups built any other way ("auto") update it as wrap's optimizer does; and the factor on the
# cap of a network with a long chain of layers in series (nerofy.rewrite.chain_factor), read in
# every group
CARRIED_LAYOUT, CARRIED_MIN_SCALE, CARRIED_CLIP = "_nerofy_layout", "_nerofy_min_scale", "_nerofy_clip_scale"


def _layout_of(p: Tensor, group: dict) -> NeuronLayout:
    """A group's layout for ``p``; in an "auto" group, the layout ``nerofy.wrap`` gave the tensor
    (it carries it: GPT-2's (in, out) weights are not rows) before the paper's rule."""
    spec = group["layout"]
    if spec == "auto":
        spec = getattr(p, CARRIED_LAYOUT, spec)
    return _resolve(spec, tuple(p.shape))


# ---------------------------------------------------------------------------------------------
# the update, over lists of tensors
# ---------------------------------------------------------------------------------------------
def _neuron_norms(gs: list[Tensor], dims: list[tuple[int, ...]]) -> list[Tensor]:
    return [torch.linalg.vector_norm(g, dim=d, keepdim=True) for g, d in zip(gs, dims)]


def _prev_correction(t: int, beta: float) -> float:
    """1 / (1 - beta^(t-1)): the bias correction of ``v`` before step ``t`` (0 at the first step,
    where ``v`` is 0 and no limit applies)."""
    return 0.0 if t <= 1 else 1.0 / (1.0 - beta ** (t - 1))


def _update_v(vs: list[Tensor], sqs: list[Tensor], steps: list[int], beta: float, clip_inv: float) -> None:
    """``v <- beta v + (1 - beta) min(||g||^2, clip^2 v_hat)`` in place (foreach; ``sqs`` is consumed):
    with a cap, the running average takes each gradient clipped at ``clip`` times its running rms,
    as the step does (see :func:`clip_inv`); where ``v`` is still 0 (the first step, a neuron
    whose gradient was zero so far) the whole sample enters."""
    if clip_inv:
        c2 = 1.0 / (clip_inv * clip_inv)
        lim = torch._foreach_mul(vs, [c2 * _prev_correction(t, beta) for t in steps])
        # lim - (sign(v) - 1) sq: the limit where v > 0, the sample itself where v == 0 (lim = 0 there)
        off = torch._foreach_sign(vs)
        torch._foreach_sub_(off, 1.0)
        torch._foreach_addcmul_(lim, off, sqs, value=-1.0)
        torch._foreach_minimum_(sqs, lim)
    torch._foreach_mul_(vs, beta)
    torch._foreach_add_(vs, sqs, alpha=1.0 - beta)


def _all_finite(norm_lists: list[list[Tensor]]) -> bool:
    """One host sync for the whole step: are all gradient norms finite?"""
    parts = [torch.stack(torch._foreach_norm(ns, 1)) for ns in norm_lists if ns]
    return not parts or bool(torch.isfinite(torch.cat(parts).sum()))


def nero_update(
    neurons: list[tuple[Tensor, Tensor, Tensor, NeuronLayout, int, float]],
    elements: list[tuple[Tensor, Tensor, Tensor, int, float]],
    *,
    lr: float,
    beta: float,
    eps: float,
    foreach: bool = True,
    skip_nonfinite: bool = True,
    fused: bool = False,
    counter: Tensor | None = None,
    clip_inv: float = 0.0,
    v_clip_inv: float | None = None,
) -> int:
    """Apply one Nero step in place.

    ``neurons``: (weight, grad, v, layout, step, scale) with per-neuron state ``v``.
    ``elements``: (weight, grad, v, step, scale) with per-element state ``v``.
    Weights and v must be fp32 here (the optimizer upcasts low-precision parameters).
    ``fused``: update the tensors the fused CPU kernel can take (fp32 on CPU, each neuron one
    contiguous block of memory) with it, and the rest with the foreach (or reference) path; silently
    all foreach/reference where the kernel is unavailable (see :mod:`nerofy._fused`).
    ``counter``: an int64 tensor on the tensors' device; when given, non-finite gradients are
    masked and counted into it on the device (no host sync, the foreach path's route off the CPU),
    and they are not part of the returned count.
    ``clip_inv``: 1 / clip, 0 for no cap on a step (see :func:`clip_inv`).
    ``v_clip_inv``: 1 / the clip of the gradient the running average takes (default
    ``v_limit(clip_inv)``; 0: the whole gradient, as in the paper; Nero's ``clip_v``).
    Returns the number of neurons/elements whose non-finite gradient was treated as zero.
    """
    lr = float(lr)  # a 0-dim tensor lr (accepted by Nero) cannot go into the foreach scalar lists
    v_clip_inv = v_limit(clip_inv) if v_clip_inv is None else v_clip_inv
    skipped = 0
    if foreach and any(x[0].is_complex() for x in (*neurons, *elements)):
        # complex weights (spectral layers): the reference path, whose squares are |g|^2
        cn, ce = [x for x in neurons if x[0].is_complex()], [x for x in elements if x[0].is_complex()]
        neurons = [x for x in neurons if not x[0].is_complex()]
        elements = [x for x in elements if not x[0].is_complex()]
        skipped += _update_reference(cn, ce, lr=lr, beta=beta, eps=eps, skip_nonfinite=skip_nonfinite,
                                     clip_inv=clip_inv, v_clip_inv=v_clip_inv)
    if fused:
        from . import _fused

        if _fused.available():
            fn, fe, neurons, elements, _ = _fused.partition(neurons, elements)
            skipped += _fused.run(fn, fe, lr=lr, beta=beta, eps=eps, skip_nonfinite=skip_nonfinite,
                                  clip_inv=clip_inv, v_clip_inv=v_clip_inv)
            if not neurons and not elements:
                return skipped
    if not foreach:
        return skipped + _update_reference(neurons, elements, lr=lr, beta=beta, eps=eps, skip_nonfinite=skip_nonfinite,
                                           clip_inv=clip_inv, v_clip_inv=v_clip_inv)

    # ---- per-neuron tensors -------------------------------------------------------------
    nw, ng, ndims, nv, nlay = [], [], [], [], []
    for w, g, v, lay, _, _ in neurons:
        wv, d = lay.neuron_view(w)
        gv, _ = lay.neuron_view(g)
        nw.append(wv), ng.append(gv), ndims.append(d), nv.append(v), nlay.append(lay)
    norms = _neuron_norms(ng, ndims)
    eg = [g for _, g, _, _, _ in elements]
    enorm = list(torch._foreach_norm(eg)) if eg and skip_nonfinite and counter is None else []

    if skip_nonfinite and counter is not None:
        ng, norms, eg = _sanitize_on_device(ng, norms, eg, counter)
    elif skip_nonfinite and not _all_finite([norms, enorm]):
        ng, norms, eg, n_bad = _sanitize(ng, norms, eg)
        skipped += n_bad

    if neurons:
        _update_v(nv, torch._foreach_mul(norms, norms), [t for _, _, _, _, t, _ in neurons], beta, v_clip_inv)
        coef = torch._foreach_div(nv, [1.0 - beta ** t for _, _, _, _, t, _ in neurons])
        torch._foreach_sqrt_(coef)
        torch._foreach_clamp_min_(coef, eps)
        if clip_inv:  # the step's size is at most clip * lr: the denominator at least ||g|| / clip
            torch._foreach_maximum_(coef, torch._foreach_mul(norms, clip_inv))
        torch._foreach_reciprocal_(coef)
        torch._foreach_mul_(coef, [-lr * s for _, _, _, _, _, s in neurons])
        torch._foreach_addcmul_(nw, ng, coef)
        for wv, d, lay in zip(nw, ndims, nlay):
            _project_(wv, d, lay)

    if elements:
        ew = [w for w, _, _, _, _ in elements]
        ev = [v for _, _, v, _, _ in elements]
        _update_v(ev, torch._foreach_mul(eg, eg), [t for _, _, _, t, _ in elements], beta, v_clip_inv)
        denom = torch._foreach_div(ev, [1.0 - beta ** t for _, _, _, t, _ in elements])
        torch._foreach_sqrt_(denom)
        torch._foreach_clamp_min_(denom, eps)
        if clip_inv:
            torch._foreach_maximum_(denom, torch._foreach_mul(torch._foreach_abs(eg), clip_inv))
        torch._foreach_addcdiv_(ew, eg, denom, [-lr * s for _, _, _, _, s in elements])
    return skipped


def _project_(wv: Tensor, dims: tuple[int, ...], lay: NeuronLayout, eps: float = 1e-12) -> None:
    """In-place centring and normalisation of each neuron.

    Two-pass (subtract the mean, then divide by the norm) rather than one-pass statistics:
    ``var_mean`` is several times slower on CPU, and sum/sum-of-squares loses precision when a
    neuron is far from zero-mean (the first step of an unprojected model).
    """
    if lay.center:
        wv.sub_(wv.mean(dim=dims, keepdim=True))
    if lay.normalize:
        wv.div_(torch.linalg.vector_norm(wv, dim=dims, keepdim=True).clamp_min_(eps))


def _sanitize(ng, norms, eg):
    """Treat the gradient of any neuron (or element) holding NaN/inf as zero for this step."""
    skipped = 0
    ng2, norms2 = [], []
    for g, nrm in zip(ng, norms):
        bad = ~torch.isfinite(nrm)
        if bad.any():
            skipped += int(bad.sum())
            g = g.masked_fill(bad, 0.0)
            nrm = nrm.masked_fill(bad, 0.0)
        ng2.append(g), norms2.append(nrm)
    eg2 = []
    for g in eg:
        bad = ~torch.isfinite(g)
        if bad.any():
            skipped += int(bad.sum())
            g = g.masked_fill(bad, 0.0)
        eg2.append(g)
    return ng2, norms2, eg2, skipped


def _sanitize_on_device(ng, norms, eg, counter: Tensor):
    """:func:`_sanitize` without reading anything back: masks and counts stay on the device."""
    ng2, norms2, eg2 = [], [], []
    for g, nrm in zip(ng, norms):
        bad = ~torch.isfinite(nrm)
        counter.add_(bad.sum())
        ng2.append(torch.where(bad, 0.0, g)), norms2.append(torch.where(bad, 0.0, nrm))
    for g in eg:
        bad = ~torch.isfinite(g)
        counter.add_(bad.sum())
        eg2.append(torch.where(bad, 0.0, g))
    return ng2, norms2, eg2


def _update_reference(neurons, elements, *, lr, beta, eps, skip_nonfinite, counter: Tensor | None = None,
                      clip_inv: float = 0.0, v_clip_inv: float | None = None):
    """Plain per-parameter implementation of the same mathematics (the foreach path's oracle).

    ``clip_inv``: 1 / clip (0: no cap); a neuron's step is ``lr * s * g / max(sqrt(v_hat), eps,
    ||g|| * clip_inv)``, so it turns by at most ``clip * lr`` (see :func:`clip_inv`); ``v`` takes the
    gradient clipped at ``1 / v_clip_inv`` times its running rms (default ``v_limit(clip_inv)``; 0: whole).

    With ``counter`` (``capturable=True`` off the Triton route, and under ``torch.compile``) nothing
    is read back to the host: ``lr`` may be a tensor, step counts may be device tensors, and
    non-finite gradients are counted into ``counter`` on the device instead of returned."""
    skipped = 0
    v_clip_inv = v_limit(clip_inv) if v_clip_inv is None else v_clip_inv

    def masked(bad: Tensor) -> None:
        nonlocal skipped
        if counter is not None:
            counter.add_(bad.sum())
        else:
            skipped += int(bad.sum())

    for w, g, v, lay, t, s in neurons:
        wv, d = lay.neuron_view(w)
        gv, _ = lay.neuron_view(g)
        sq = _sq(gv).sum(dim=d, keepdim=True)
        if skip_nonfinite:
            bad = ~torch.isfinite(sq)
            masked(bad)
            gv, sq = gv.masked_fill(bad, 0.0), sq.masked_fill(bad, 0.0)
        sample = _clipped_sample(sq, v, t, beta, v_clip_inv)  # from v before this step's decay
        v.mul_(beta).add_((1.0 - beta) * sample)
        v_hat = v / (1.0 - beta ** t)
        den = v_hat.sqrt().clamp_min(eps)
        if clip_inv:
            den = torch.maximum(den, sq.sqrt() * clip_inv)
        wv.sub_(lr * s * gv / den)
        if lay.center:
            wv.sub_(wv.mean(dim=d, keepdim=True))
        if lay.normalize:
            wv.div_(torch.linalg.vector_norm(wv, dim=d, keepdim=True).clamp_min(1e-12))
    for w, g, v, t, s in elements:
        if skip_nonfinite:
            bad = ~torch.isfinite(g)
            masked(bad)
            g = g.masked_fill(bad, 0.0)
        sq = _sq(g)
        sample = _clipped_sample(sq, v, t, beta, v_clip_inv)
        v.mul_(beta).add_((1.0 - beta) * sample)
        v_hat = v / (1.0 - beta ** t)
        den = v_hat.sqrt().clamp_min(eps)
        if clip_inv:
            den = torch.maximum(den, sq.sqrt() * clip_inv)
        w.sub_(lr * s * g / den)
    return skipped


def _clipped_sample(sq: Tensor, v: Tensor, t, beta: float, clip_inv: float) -> Tensor:
    """What the running average takes at step ``t``: ``||g||^2`` clipped at ``clip^2`` times
    ``v``'s bias-corrected value before this step (:func:`_update_v`'s rule; ``t`` may be a device
    tensor in capturable mode)."""
    if not clip_inv:
        return sq
    prev = 1.0 - beta ** (t - 1)
    prev = prev.clamp_min(1e-30) if isinstance(prev, Tensor) else max(prev, 1e-30)
    return torch.where(v > 0, torch.minimum(sq, v / (prev * clip_inv * clip_inv)), sq)


def _sq(t: Tensor) -> Tensor:
    """|t|^2 elementwise, real also for complex ``t`` (a complex weight is two real ones)."""
    return t.real.square() + t.imag.square() if t.is_complex() else t.square()


# ---------------------------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------------------------
class Nero(torch.optim.Optimizer):
    """Nero, a ``torch.optim.Optimizer``: per-neuron adaptive steps on the balanced set.

    Args:
        params: parameters or parameter groups. A group may carry its own ``lr``, ``beta`` and
            ``layout``.
        lr: the angle (radians) each balanced neuron turns per step. Default 0.01.
        beta: decay of the per-neuron second-moment estimate, in [0, 1). Default 0.999.
        layout: how a group's tensors split into neurons. ``"auto"`` (default): a tensor of a
            model wrapped by nerofy gets the layout (and least step scale) ``wrap`` gave it;
            any other follows the paper: every tensor with ``dim > 1`` (and fan-in > 1) is balanced
            along axis 0, everything else is updated per element, unconstrained. A :class:`NeuronLayout` applies to every tensor
            of the group (``nerofy.wrap`` builds one group per layout). A constrained layout on a
            fan-in-1 tensor falls back to per-element updates, with a logged warning.
        eps: floor of ``sqrt(v_hat)``; a zero gradient gives a zero step, never NaN.
        scale_floor: step scale ``s`` of an unconstrained tensor that is all zero at the start.
        min_scale: the least step scale ``s`` of an unconstrained tensor (default 0: the paper's
            mean magnitude alone). ``nerofy.wrap`` gives its gain groups 1 (a gain's unit), so a
            zero- or tiny-initialised gain (timm's zero-init last BN, LayerScale at 1e-5) moves at
            ``lr`` per step, not at ``lr * 0.01`` or ``lr * 1e-5``.
        foreach: multi-tensor implementation (default) or the plain per-parameter reference.
        fused: ``None`` (default) updates every tensor it can with a fused CPU kernel that does the
            whole step in one pass per neuron (about 2.5x faster than foreach; see
            :mod:`nerofy._fused`: built once per machine with the system C compiler and cached) and
            the rest with the foreach path: tensors not on the CPU or not fp32 (fp16/bf16 parameters
            are upcast first, so they qualify), layouts whose neurons are not contiguous in memory,
            or every tensor when no compiler is found. On CUDA the fused step is a Triton kernel
            (:mod:`nerofy._triton`, used when triton is importable): a few launches per step for
            all tensors of all groups, fp32/bf16/fp16 in place, no host sync; the tensors it
            cannot take (complex, tensor subclasses, fan-ins that need more than two strides)
            take the foreach path. ``True``: the same, but logs one warning
            (logger ``"nerofy"``) the first time some tensor cannot use the kernel. ``False``: never.
            The fused path computes the same update as the reference to float rounding.
            ``fused=True`` with ``foreach=False`` is an error; ``foreach=False`` alone means the
            reference path only.
        skip_nonfinite: if a neuron's (or an unconstrained element's) gradient holds NaN or inf,
            that neuron is treated as having a zero gradient for this step: its weights stay as
            they are (up to re-projection) and its second-moment estimate decays as for a zero
            gradient; every other neuron steps normally. On the CPU a warning is logged at once;
            on a GPU and in capturable mode the mask and the count stay on the device (no host
            sync) and :meth:`skipped` reads the count when asked. Set False to skip the check
            (non-finite gradients then poison the weights, as with other optimizers).
        capturable: keep ``step`` counts on the parameters' device and read ``lr`` there (a float,
            or a 0-dim fp32 tensor on that device that you update in place), so that ``step()``
            issues no host sync and can be captured in a CUDA graph or compiled with
            ``torch.compile(fullgraph=True)``. Take one step before capturing: the first step
            creates the state (and reads each unconstrained tensor's mean magnitude once).
        clip: the longest step, in units of ``lr``: a neuron's (or element's) step
            ``lr * s * g / sqrt(v_hat)`` is shortened so that ``||g|| / sqrt(v_hat) <= clip``.
            Default 2.0: no neuron turns by more than ``2 lr`` per step (1.0 trained the deep
            MLPs best but cost the transformers 2-4%; 2.0 costs them <= 1%). ``v_hat`` is a slow average
            (beta 0.999), so a gradient far above its history (a loss spike) would otherwise turn
            its neurons by up to ``lr / sqrt(1 - beta)``, 31 ``lr``; capped, a 50-layer plain ReLU
            MLP trains where the uncapped update stalls (docs/results.md §0). ``None``: the
            paper's update, uncapped. A group option like ``lr``. ``nerofy.wrap`` shortens it on a
            network with a long chain of layers in series (see ``chain_ref`` there): the factor
            is carried by the tensors and applied in any group.
        clip_v: the running average takes each gradient clipped as the step is (``||g||`` at most
            ``max(clip, 1) * sqrt(v_hat)``; default True), so that one spike (a gradient 1000x its
            history) does not inflate ``v_hat`` and shrink that neuron's next thousand steps; on
            plain deep MLPs that was the difference between stalled and steadily turning neurons
            (docs/results.md §0). False: ``v`` takes the whole gradient, as in the paper (with
            ``clip=None`` the two are the same). A group option like ``lr``.
        weight_decay: accepted so that optimizer factories (timm's ``create_optimizer_v2``, param
            groups built the torch way) can pass it, but only 0: Nero has no weight decay (a
            balanced neuron's norm is fixed). Anything else, here or in a param group, is an error.

    State, per parameter: ``step`` (its own counter, so a parameter that starts training late
    gets the right bias correction), ``v`` (fp32, one value per neuron; per element for
    unconstrained tensors) and ``scale`` (``s``). fp16/bf16 parameters are updated in fp32 and
    rounded back.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.01,
        beta: float = 0.999,
        layout: NeuronLayout | str = "auto",
        eps: float = 1e-16,
        scale_floor: float = 0.01,
        min_scale: float = 0.0,
        foreach: bool | None = None,
        skip_nonfinite: bool = True,
        fused: bool | None = None,
        weight_decay: float = 0.0,
        capturable: bool = False,
        clip: float | None = DEFAULT_CLIP,
        clip_v: bool = True,
    ):
        _check_weight_decay(weight_decay)
        _check_hparams(lr, beta, eps, scale_floor, min_scale)
        check_clip(clip)
        _check_clip_v(clip_v)
        defaults = dict(clip=clip, clip_v=clip_v,
            lr=lr, beta=beta, layout=_parse_layout(layout), eps=eps, scale_floor=scale_floor, min_scale=min_scale,
            foreach=True if foreach is None else bool(foreach), skip_nonfinite=skip_nonfinite,
            fused=None if fused is None else bool(fused), capturable=bool(capturable),
        )
        params = [params] if isinstance(params, Tensor) else _as_list(params, "params")
        if not params:
            raise ValueError("Nero got an empty parameter list: pass model.parameters() with trainable tensors")
        groups = [dict(p) if isinstance(p, dict) else p for p in params]
        for g in groups:
            ts = g["params"] if isinstance(g, dict) else [g]
            ts = [ts] if isinstance(ts, Tensor) else _as_list(ts, "a group's 'params'")
            if isinstance(g, dict):
                g["params"] = ts
            for t in ts:
                if isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str):
                    t = t[1]  # named parameters, as torch optimizers accept
                if not isinstance(t, Tensor):
                    raise ValueError(f"Nero can only optimize tensors, got {type(t).__name__}: pass model.parameters()")
        params = groups
        super().__init__(params, defaults)
        self._skipped_host = 0  # counted on the CPU paths (which read their masks anyway)
        self._counters: dict[torch.device, Tensor] = {}  # counted on the device, read by skipped()
        self._triton_steps: dict[tuple, Any] = {}  # nerofy._triton.TritonStep per (device, capturable)

    def skipped(self, reset: bool = False) -> int:
        """How many neurons (and unconstrained elements) had a non-finite gradient treated as zero,
        summed over every step since this optimizer was made (or since ``skipped(reset=True)``).

        The GPU and capturable routes keep the count on the device, so ``step()`` never waits for
        it; this call reads it (one sync per device): call it where you already sync, e.g. when
        logging the loss."""
        counters = getattr(self, "_counters", {})
        n = getattr(self, "_skipped_host", 0) + sum(int(c.item()) for c in counters.values())
        if reset:
            self._skipped_host = 0
            for c in counters.values():
                c.zero_()
        return n

    def _counter(self, device: torch.device) -> Tensor:
        if not hasattr(self, "_counters"):
            self._skipped_host, self._counters, self._triton_steps = 0, {}, {}
        c = self._counters.get(device)
        if c is None:
            c = self._counters[device] = torch.zeros(1, dtype=torch.int64, device=device)
        return c

    def add_param_group(self, param_group: dict) -> None:
        _check_weight_decay(param_group.get("weight_decay", 0.0))
        if "layout" in param_group:
            param_group["layout"] = _parse_layout(param_group["layout"])
        _check_hparams(param_group.get("lr", self.defaults["lr"]), param_group.get("beta", self.defaults["beta"]),
                       param_group.get("eps", self.defaults["eps"]), param_group.get("scale_floor", self.defaults["scale_floor"]),
                       param_group.get("min_scale", self.defaults["min_scale"]))
        check_clip(param_group.get("clip", self.defaults.get("clip", DEFAULT_CLIP)))
        _check_clip_v(param_group.get("clip_v", True))
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if g.get("fused") is True and g.get("foreach") is False:
            self.param_groups.pop()
            raise ValueError("Nero: fused=True and foreach=False exclude each other (foreach=False is the reference path)")
        # reject layouts that do not fit a tensor early, with the parameter's shape in the error
        g = self.param_groups[-1]
        for p in g["params"]:
            if isinstance(g["layout"], NeuronLayout):
                g["layout"].check(tuple(p.shape))

    # -- state ---------------------------------------------------------------------------
    def _init_state(self, p: Tensor, lay: NeuronLayout, group: dict) -> dict:
        st = self.state[p]
        w = p.detach() if p.is_complex() else p.detach().float()  # complex: |w| needs the imaginary part
        if lay.elementwise:
            st["v"] = torch.zeros_like(w, dtype=torch.float32, memory_format=torch.preserve_format)
            mags = w.abs()
        else:
            wv, d = lay.neuron_view(w)
            mags = torch.linalg.vector_norm(wv, dim=d, keepdim=True)
            st["v"] = torch.zeros_like(mags, dtype=torch.float32)
        if lay.normalize:
            s = 1.0
        else:
            m = mags.mean() if mags.numel() else torch.zeros(())
            if hasattr(m, "full_tensor"):  # a sharded (DTensor) parameter: the global mean, same on every rank
                m = m.full_tensor()
            least = group.get("min_scale", 0.0)  # groups from older checkpoints lack it
            if group["layout"] == "auto":
                least = max(least, getattr(p, CARRIED_MIN_SCALE, 0.0))  # as nerofy.wrap gave it
            s = max(float(m), least)
            if not math.isfinite(s) or s <= 0.0:
                s = group["scale_floor"]
        st["step"] = 0
        st["scale"] = s
        return st

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        on_triton: dict[tuple, list] = {}  # (device, capturable) -> items, all groups in one step
        for group in self.param_groups:
            # the work per cap (1 / clip, and that of v): one list for a group unless its tensors carry
            # different factors
            work: dict[tuple[float, float], tuple[list, list]] = {}
            writeback = []
            capturable = group.get("capturable", False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Nero does not support sparse gradients (use a dense embedding)")
                lay = self._layout(p, group)
                st = self.state[p] if self.state.get(p) else self._init_state(p, lay, group)
                if self._triton_takes(p, lay, group, st):
                    if not capturable:
                        st["step"] = _host_step(st["step"]) + 1
                    # p itself, not p.detach(): the kernel only needs its address (and detach is an op per tensor)
                    on_triton.setdefault((p.device, capturable), []).append((p, p.grad, st["v"], lay, group, st))
                    continue
                if capturable:
                    st["step"] = _device_step(st["step"], p.device)
                    st["step"].add_(1)
                else:
                    st["step"] = _host_step(st["step"]) + 1
                if p.dtype in _LOW_PRECISION:
                    w, g = p.detach().float(), p.grad.float()
                    writeback.append((p, w))
                else:
                    w, g = p.detach(), p.grad
                ci = clip_inv(group, p)
                neurons, elements = work.setdefault((ci, v_limit(ci) if group.get("clip_v", True) else 0.0), ([], []))
                if lay.elementwise:
                    elements.append((w, g, st["v"], st["step"], st["scale"]))
                else:
                    neurons.append((w, g, st["v"], lay, st["step"], st["scale"]))
            for caps, (neurons, elements) in work.items():
                self._update(group, neurons, elements, caps, capturable)
            for p, w in writeback:
                p.copy_(w)
        for (device, capturable), items in on_triton.items():
            runner = self._triton_steps.get((device, capturable))
            if runner is None:
                runner = self._triton_steps[(device, capturable)] = _triton.TritonStep()
            runner.run(items, self._counter(device), capturable)
        return loss

    def _update(self, group: dict, neurons: list, elements: list, caps: tuple[float, float], capturable: bool) -> None:
        """One group's step over tensors that share the caps ``(1 / clip, 1 / clip of v)``."""
        ci, vci = caps
        if capturable:
            _update_reference(neurons, elements, lr=group["lr"], beta=group["beta"], eps=group["eps"],
                              skip_nonfinite=group["skip_nonfinite"], counter=self._counter((neurons or elements)[0][0].device),
                              clip_inv=ci, v_clip_inv=vci)
            return
        skipped = 0
        fused = group.get("fused")
        if fused or (fused is None and group["foreach"] is not False):
            skipped, neurons, elements = self._step_fused(group, neurons, elements, explicit=bool(fused), caps=caps)
        if neurons or elements:
            dev = (neurons or elements)[0][0].device
            # off the CPU, the non-finite mask stays on the device (a host sync would stall the queue)
            counter = self._counter(dev) if dev.type != "cpu" else None
            skipped += nero_update(
                neurons, elements, lr=group["lr"], beta=group["beta"], eps=group["eps"],
                foreach=group["foreach"], skip_nonfinite=group["skip_nonfinite"], counter=counter, clip_inv=ci,
                v_clip_inv=vci,
            )
        if skipped:
            self._skipped_host = getattr(self, "_skipped_host", 0) + skipped
            log.warning("Nero: %d neurons/elements had a non-finite gradient; treated as zero this step", skipped)

    def _layout(self, p: Tensor, group: dict) -> NeuronLayout:
        """:func:`_layout_of`, remembered per parameter (so that torch.compile traces a dict lookup,
        not the layout arithmetic)."""
        cache = self.__dict__.setdefault("_layouts", {})
        hit = cache.get(p)
        if hit is not None and hit[0] is group["layout"] and hit[1] == p.shape:
            return hit[2]
        lay = _layout_of(p, group)
        cache[p] = (group["layout"], p.shape, lay)
        return lay

    def _triton_takes(self, p: Tensor, lay: NeuronLayout, group: dict, st: dict) -> bool:
        """Whether ``p`` takes the Triton step (CUDA, triton importable, fused not switched off)."""
        if p.device.type != "cuda" and not _triton.ON_CPU:
            return False
        if group.get("fused") is False or group["foreach"] is False or torch.compiler.is_compiling():
            return False
        if not hasattr(self, "_triton_steps"):
            self._counter(p.device)  # an optimizer unpickled from an older nerofy
        return _triton.takes(p, lay, st["v"])

    def _step_fused(self, group: dict, neurons: list, elements: list, explicit: bool, caps: tuple[float, float]):
        """Run the fused kernel on what it can take; return (skipped, rest_neurons, rest_elements)."""
        from . import _fused

        if torch.compiler.is_compiling():
            return 0, neurons, elements  # dynamo cannot see into the C kernel: it traces foreach

        if not _fused.available():
            n_rest, why, skipped = len(neurons) + len(elements), _fused.unavailable_reason(), 0
        else:
            fn, fe, neurons, elements, why = _fused.partition(neurons, elements)
            skipped = _fused.run(fn, fe, lr=group["lr"], beta=group["beta"], eps=group["eps"],
                                 skip_nonfinite=group["skip_nonfinite"], clip_inv=caps[0], v_clip_inv=caps[1])
            n_rest = len(neurons) + len(elements)
        if n_rest and explicit and not getattr(self, "_fused_warned", False):
            self._fused_warned = True
            log.warning("Nero(fused=True): the fused kernel cannot take %d tensor(s) of a parameter group (%s); "
                        "they take the foreach path. This warning is logged once per optimizer.", n_rest, why)
        return skipped, neurons, elements

    @torch.no_grad()
    def project_(self) -> None:
        """Project every constrained parameter onto the balanced set now (e.g. after loading)."""
        for group in self.param_groups:
            for p in group["params"]:
                lay = _layout_of(p, group)
                if lay.constrained and not lay.elementwise:
                    w = p.detach().float() if p.dtype in _LOW_PRECISION else p.detach()
                    wv, d = lay.neuron_view(w)
                    _project_(wv, d, lay)
                    if w is not p:
                        p.copy_(w)

    # -- (de)serialisation: plain types only (torch.load(weights_only=True) works), state fp32 --
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g["layout"] = _layout_to_dict(g["layout"])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as ``torch.optim.Optimizer`` does: the saved groups' parameters map onto this
        optimizer's by order, whatever they are keyed by (indices, or the parameter names that
        ``torch.distributed.checkpoint`` uses). Nero's state stays fp32 whatever the parameters' dtype."""
        sd = dict(state_dict)
        sd["param_groups"] = [dict(g, layout=_parse_layout(g.get("layout", "auto"))) for g in state_dict["param_groups"]]
        super().load_state_dict(sd)
        saved_ids = [k for g in state_dict["param_groups"] for k in g["params"]]
        id_map = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        # torch casts state to each parameter's dtype; Nero keeps its state in fp32
        for key, st in state_dict["state"].items():
            p = id_map.get(key)
            if p is None:
                continue
            for k, v in st.items():
                if isinstance(v, Tensor):
                    self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)


def _host_step(s) -> int:
    """A step count as a Python int (a capturable checkpoint's tensor is read once)."""
    return int(s.item()) if isinstance(s, Tensor) else s


def _device_step(s, device: torch.device) -> Tensor:
    """A step count as a 0-dim fp32 tensor on ``device`` (capturable mode)."""
    if isinstance(s, Tensor) and s.device == device and s.dtype == torch.float32:
        return s
    if isinstance(s, Tensor):
        return s.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(s), dtype=torch.float32, device=device)


def _as_list(x, what: str) -> list:
    try:
        return list(x)
    except TypeError:
        raise ValueError(f"Nero's {what} must be an iterable of tensors or parameter groups, got "
                         f"{type(x).__name__}: pass model.parameters()") from None


def _check_weight_decay(wd) -> None:
    if isinstance(wd, (int, float)) and not isinstance(wd, bool) and wd == 0:
        return
    raise ValueError(f"Nero has no weight decay (a balanced neuron keeps a fixed norm; the paper uses none): got "
                     f"weight_decay={wd!r}. Pass weight_decay=0, or leave it out (timm: create_optimizer_v2(..., "
                     "weight_decay=0)).")


def _check_hparams(lr, beta, eps, scale_floor, min_scale=0.0):
    if not (isinstance(lr, (int, float, Tensor)) and float(lr) >= 0.0 and math.isfinite(float(lr))):
        raise ValueError(f"Invalid learning rate {lr!r}: Nero's lr is an angle in radians, use a value >= 0 such as 0.01")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
        raise ValueError(f"Invalid beta {beta!r}: it must lie in [0, 1) (default 0.999)")
    if not (eps > 0.0):
        raise ValueError(f"Invalid eps {eps!r}: it must be > 0")
    if not (scale_floor > 0.0):
        raise ValueError(f"Invalid scale_floor {scale_floor!r}: it must be > 0")
    check_min_scale(min_scale)


def check_clip(clip) -> None:
    if clip is None:
        return
    if not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0.0):
        raise ValueError(f"Invalid clip {clip!r}: it must be a number > 0 (2.0, the default: no neuron turns more than 2 lr per "
                         "step) or None (the paper's uncapped update)")


def v_limit(clip_inv: float) -> float:
    """1 / the clip of the gradient the running average takes, for a step capped at ``1 / clip_inv``:
    ``max(clip, 1)`` times the running rms. A spike is clipped as the step is; a cap below 1 (a long
    chain, see ``nerofy.wrap``'s ``chain_ref``) does not feed ``v`` less than itself, which would
    shrink it without end. At 1, ``v_hat`` can fall with the gradient but not rise: where gradients
    grow, such a chain's steps are fixed turns at the cap (the best steps on deep plain MLPs,
    benchmarks/chain_sweep.py), where they shrink, shorter ones. 0: no cap, the whole gradient."""
    return min(clip_inv, 1.0)


def _check_clip_v(clip_v) -> None:
    if not isinstance(clip_v, bool):
        raise ValueError(f"Invalid clip_v {clip_v!r}: True (the running average takes the clipped gradient, the "
                         "default) or False (the whole gradient, as in the paper)")


def clip_inv(group: dict, p: Tensor | None = None) -> float:
    """1 / the cap on ``p``'s step (the group's clip times the factor ``p`` carries, see
    ``CARRIED_CLIP``), 0 for none. A step is ``lr * s * g / sqrt(v_hat)`` and ``v_hat`` is a
    slow average (beta 0.999): when a neuron's gradient jumps far above it, the paper's step turns
    that neuron by up to ``lr / sqrt(1 - beta)`` (31 lr). The cap bounds the ratio ``||g|| /
    sqrt(v_hat)`` at ``clip`` (Adafactor's update clipping, per neuron), and the running average
    takes the gradient clipped the same way, so one spike does not shrink the next thousand steps.
    Groups from older checkpoints lack the key: they get the default."""
    c = group.get("clip", DEFAULT_CLIP)
    if c is None or c == math.inf:
        return 0.0
    f = getattr(p, CARRIED_CLIP, 1.0) if p is not None else 1.0
    return 1.0 / (float(c) * f)


def check_min_scale(min_scale) -> None:
    if not (isinstance(min_scale, (int, float)) and 0.0 <= min_scale < math.inf):
        raise ValueError(f"Invalid min_scale {min_scale!r}: it must be a finite number >= 0 (0: the paper's scale)")
