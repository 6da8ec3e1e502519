"""The balanced parametrization: each neuron's incoming weights zero-mean and unit-norm.

``torch.nn.utils.parametrize`` stores a free tensor ``V`` and computes the weight as
``scale * normalize(center(V))`` in every forward, so the constraint holds exactly. Backward hands
``V`` either the paper's gradient (the full weight gradient, ``grad="paper"``, wrap's default) or the
true, projected gradient of ``V`` (``grad="projected"``). Nero re-projects ``V`` after each step so
that ``||V|| = 1`` and its learning rate stays an angle.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .layout import NeuronLayout, _acc
from .trained import view_gain

__all__ = ["Balanced", "balance", "fill_dead_", "is_balanced"]

log = logging.getLogger("nerofy")

# Below this norm (after centring) a neuron has no direction: it gets one (see fill_dead_).
DEAD_NORM = 1e-12


GRAD_MODES = ("paper", "projected")


class Balanced(nn.Module):
    """Parametrization ``V -> scale * normalize(center(V))`` along a :class:`NeuronLayout`.

    ``grad`` says what backward hands the stored tensor ``V``:

    * ``"projected"``: the true gradient of the loss with respect to ``V``, the weight gradient
      ``g`` projected onto the balanced set's tangent space (its radial and mean parts removed).
    * ``"paper"``: ``g`` itself (times ``scale / ||center(V)||``), as Nero receives it in the paper,
      where the network uses the balanced weights directly. Nero then normalises by the full
      ``||g||`` and re-projects after its step, which is the paper's update exactly. It is linear
      in ``g``, so gradient accumulation, DDP/FSDP all-reduces, AMP scaling and clipping act on it
      as on any gradient. It is not ``dL/dV``: with another optimizer, use ``"projected"``.
    """

    def __init__(self, layout: NeuronLayout, scale: float | Tensor = 1.0, grad: str = "projected"):
        super().__init__()
        if layout.elementwise or not layout.constrained:
            raise ValueError(f"Balanced needs a constrained neuron layout, got {layout}")
        if grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {grad!r}; choose from {', '.join(GRAD_MODES)}")
        self.layout = layout
        # a fixed per-layer gain (1 = the paper's unit norm), saved as extra state: a Python float
        # here (meta -> to_empty() cannot leave it uninitialised, as it would a buffer), a 0-dim
        # float64 tensor in state_dicts (safetensors, HF, accelerate and DCP take tensors only)
        self.scale = 1.0
        # or one gain per neuron (wrap(keep="function"): each trained neuron keeps its norm), in the
        # form that broadcasts onto the weight (nerofy.trained.dense_gain); a buffer so .to()/.cuda()
        # move it, not persistent because the extra state carries it
        self.register_buffer("neuron_gain", None, persistent=False)
        self._set_gain(scale)
        self.grad = grad  # a training choice, like the optimizer's: not saved in checkpoints

    def _set_gain(self, g: float | Tensor) -> None:
        if isinstance(g, Tensor) and g.numel() != 1:
            if not g.is_floating_point():
                raise ValueError(f"a per-neuron gain must be a floating-point tensor, got {g.dtype}")
            old = self.neuron_gain
            self.scale = 1.0
            self.neuron_gain = g.detach().to(device=old.device if old is not None else g.device,
                                             dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
        else:
            self.scale = float(g)
            self.neuron_gain = None

    @property
    def per_neuron(self) -> bool:
        return self.neuron_gain is not None

    def gain(self, like: Tensor | None = None) -> float | Tensor:
        """The gain as applied: a number, or the per-neuron tensor (times ``scale``; on ``like``'s
        device) as a keepdim tensor that broadcasts onto ``layout.neuron_view(w)``."""
        if self.neuron_gain is None:
            return self.scale
        g = view_gain(self.neuron_gain if like is None else self.neuron_gain.to(like.device), self.layout)
        return g * self.scale if self.scale != 1.0 else g

    def get_extra_state(self) -> Tensor:
        if self.neuron_gain is not None:  # the weight-broadcastable form (see nerofy.trained.dense_gain)
            g = self.neuron_gain * self.scale if self.scale != 1.0 else self.neuron_gain
            return g.detach().to(device="cpu", dtype=torch.float64)
        return torch.tensor(self.scale, dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        self._set_gain(gain_from_state(state))

    def forward(self, v: Tensor) -> Tensor:
        g = self.gain(v)
        if not self.layout.normalize:
            w = self.layout.project(v)
            if isinstance(g, Tensor):
                view, _ = self.layout.neuron_view(w)
                return (view * g.to(w.dtype)).reshape(w.shape)
            return w * g if g != 1.0 else w
        return _BalancedFn.apply(v, self.layout, g, self.grad == "paper")

    @torch.no_grad()
    def right_inverse(self, w: Tensor) -> Tensor:
        """Plain weights -> stored tensor: projected onto the balanced set (the function changes
        unless ``w`` was balanced already); neurons with no direction get one (never NaN, never 0)."""
        if w.is_meta:  # structure only: no values to project (and meta kernels are slow)
            return torch.empty_like(w)
        v, norms = self.layout.project_with_norms(w)
        fill_dead_(v, self.layout, dead=norms <= DEAD_NORM if norms is not None else None)
        return v

    def extra_repr(self) -> str:
        g = f"per-neuron ({self.neuron_gain.numel()})" if self.neuron_gain is not None else f"{self.scale:g}"
        return f"{self.layout.describe()}, center={self.layout.center}, scale={g}, grad={self.grad}"


def gain_from_state(state) -> float | Tensor:
    """A balanced layer's gain from its saved extra state: a 0-dim tensor, a number, the
    ``{"scale": s}`` dict of checkpoints written before the gain became a tensor, or a tensor of
    one gain per neuron (``wrap(keep="function")``; returned as a float64 tensor)."""
    if isinstance(state, dict):
        state = state["scale"]
    if isinstance(state, Tensor) and state.numel() != 1:
        if not state.is_floating_point():
            raise ValueError(f"a balanced layer's gain must be floating point, got {state.dtype}")
        return state.detach().to(torch.float64)
    return float(state)


class _BalancedCore(torch.autograd.Function):
    """``w = s * c / ||c||`` with ``c = V - mean(V)`` per neuron, with an analytic backward.

    Autograd through the generic ops keeps the centred copy and several temporaries alive until
    backward and runs a chain of kernels there. Here forward keeps only the output (the consuming
    conv/linear saves that tensor anyway) and one norm per neuron, and backward is the projected
    gradient ``dV = s / ||c|| * (g - mean(g) - u <u, g>)`` with ``u = c / ||c||``.
    """

    # forward without ctx plus setup_context: the form torch.func transforms (vmap, grad, jacrev,
    # functional_call inside them) accept; vmap's rule is generated from these torch ops
    generate_vmap_rule = True

    @staticmethod
    def forward(v: Tensor, layout: NeuronLayout, scale: float | Tensor, raw: bool = False) -> tuple[Tensor, Tensor]:
        # scale: one number, or one per neuron (a keepdim tensor over the neuron view)
        view, dims = layout.neuron_view(v)
        c = view - view.mean(dim=dims, keepdim=True) if layout.center else view.clone()
        norm = torch.linalg.vector_norm(c, dim=dims, keepdim=True, dtype=_acc(c.dtype)).clamp_min_(1e-12)
        r = scale / norm if not isinstance(scale, Tensor) else scale.to(norm.dtype) / norm
        if c.dtype == _acc(c.dtype):  # fp32/fp64, or complex64/128 times its (real) norm
            c.mul_(r)
        else:
            c = (c.to(_acc(c.dtype)) * r).to(v.dtype)
        return c.reshape(v.shape), norm  # the norm per neuron, for backward (not differentiable)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, layout, scale, raw = (tuple(inputs) + (False,))[:4]
        w, norm = output
        ctx.save_for_backward(w, norm)
        ctx.mark_non_differentiable(norm)
        ctx.layout, ctx.scale, ctx.raw = layout, scale, raw

    @staticmethod
    def backward(ctx, g: Tensor, _g_norm: Tensor | None = None):
        w, norm = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        acc = _acc(g.dtype)
        if isinstance(scale, Tensor):
            scale = scale.to(norm.dtype)
        if ctx.raw:  # the paper's gradient: g itself, radial and mean parts kept (see Balanced)
            gv, _ = layout.neuron_view(g)
            return (gv.to(acc) * (scale / norm)).to(g.dtype).reshape(g.shape), None, None, None
        if layout.axes == (0,) and layout.groups == 1 and w.is_contiguous() and g.is_contiguous():
            # the common case: rows of a 2-D view, reductions along dim 1 (no permuted strides)
            wv, gv, dims = w.view(w.shape[0], -1), g.view(g.shape[0], -1), (1,)
            norm = norm.view(-1, 1)
            if isinstance(scale, Tensor):
                scale = scale.reshape(-1, 1)
        else:
            wv, dims = layout.neuron_view(w)
            gv, _ = layout.neuron_view(g)
        gf = gv.to(acc)
        u = wv.to(acc)  # = s * unit direction
        # out = a (g - mean(g)) - a <u, g> / s^2 u with a = s / ||c||, in two weight-sized passes
        # after the reductions: t = -a mean(g) - coef u, then out = t + a g (no centred copy of g)
        a = scale / norm
        # <u, g> is the real inner product: a complex weight is a pair of real ones (Re conj(u) g)
        ug = (u.conj() * gf).real if gf.is_complex() else u * gf
        # a per-neuron gain may be 0 (a zero neuron kept at zero): then u = a = 0 and so is coef
        s2 = scale * scale if not isinstance(scale, Tensor) else (scale * scale).clamp_min_(1e-30)
        coef = ug.sum(dim=dims, keepdim=True).mul_(a).div_(s2)
        if layout.center:
            out = torch.addcmul(gf.mean(dim=dims, keepdim=True).mul_(-a), u, coef, value=-1.0)
        else:
            out = u * coef.neg_()
        out.addcmul_(gf, a)
        return out.to(g.dtype).reshape(g.shape), None, None, None


class _BalancedFn:
    """``_BalancedFn.apply(v, layout, scale, raw=False) -> w`` (the core also returns each neuron's norm)."""

    @staticmethod
    def apply(v: Tensor, layout: NeuronLayout, scale: float | Tensor, raw: bool = False) -> Tensor:
        return _BalancedCore.apply(v, layout, scale, raw)[0]


@torch.no_grad()
def fill_dead_(t: Tensor, layout: NeuronLayout, dead: Tensor | None = None) -> int:
    """Give every neuron of ``t`` whose centred norm is ~0 a random balanced direction, in place.

    Zero-initialised layers (zero-init heads, residual branches) would otherwise be dead forever:
    a unit-norm neuron cannot be zero, and a zero neuron has no direction to turn. Uses a fixed seed,
    so wrapping is deterministic. ``dead``: the mask if the caller has it (keepdim, neuron view).
    Returns how many neurons were filled. Meta tensors are skipped.
    """
    if t.is_meta or t.numel() == 0 or not layout.constrained:
        return 0
    view, dims = layout.neuron_view(t)
    if dead is None:
        centred = view - view.mean(dim=dims, keepdim=True) if layout.center else view
        dead = torch.linalg.vector_norm(centred, dim=dims, keepdim=True, dtype=_acc(centred.dtype)) <= DEAD_NORM
    n_dead = int(dead.sum())
    if n_dead:
        gen = torch.Generator().manual_seed(0x4E45524F)  # "NERO"
        fresh = torch.randn(view.shape, generator=gen, dtype=_acc(t.dtype)).to(view.device)
        fresh = layout.project(fresh.reshape(t.shape)).to(t.dtype)
        fresh_view, _ = layout.neuron_view(fresh)
        view.copy_(torch.where(dead, fresh_view, view))
        log.info("nerofy: %d of %d neurons had no direction (all zero); gave them random balanced weights",
                 n_dead, dead.numel())
    return n_dead


def balance(module: nn.Module, name: str, layout: NeuronLayout, scale: float | Tensor = 1.0,
            grad: str = "projected") -> Balanced:
    """Constrain ``module.<name>`` to the balanced set along ``layout`` (in place) and return the
    parametrization. The stored tensor becomes ``module.parametrizations[name].original``."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"balance() needs an nn.Module, got {type(module).__name__}")
    p = getattr(module, name, None)
    if not isinstance(p, Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor attribute {name!r}")
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is already parametrized; nerofy will not stack constraints")
    layout.check(tuple(p.shape))
    if layout.fan_in(p.shape) <= 1:
        raise ValueError(
            f"{type(module).__name__}.{name} of shape {tuple(p.shape)} has fan-in 1 along "
            f"{layout.describe()}: a balanced neuron would be +-1 (or 0 once centred). Leave it "
            "unconstrained (role 'gain') instead."
        )
    b = Balanced(layout, scale, grad)
    # unsafe=True skips parametrize's consistency forward: Balanced keeps shape and dtype by
    # construction, and that extra projection was a third of wrap's time on big models
    parametrize.register_parametrization(module, name, b, unsafe=True)
    return b


def is_balanced(module: nn.Module, name: str | None = None) -> bool:
    """Whether ``module`` (or its tensor ``name``) carries a nerofy balanced parametrization."""
    if not parametrize.is_parametrized(module, name):
        return False
    names = [name] if name else list(module.parametrizations.keys())
    return any(isinstance(pz, Balanced) for n in names for pz in module.parametrizations[n])
