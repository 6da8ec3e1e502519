"""Neuron layouts: which axes of a tensor index neurons, and how to reduce over a neuron's fan-in.

A layout is the one piece of information the optimizer and the parametrization share. A tensor is
seen as a set of *neurons*; each neuron owns the slice of the tensor that its neuron-axis indices
select (its incoming weights, or its "fan-in"). Examples:

* ``nn.Linear`` weight ``(out, in)``: neurons along axis 0, fan-in ``in``.
* ``(in, out)`` weight used as ``x @ W``: neurons along the last axis.
* grouped ``ConvTranspose2d`` weight ``(in, out/g, kh, kw)``: neurons along axis 1 *and* the group
  index of axis 0 (``split_axis=0, groups=g``): each output channel only sees its group's inputs.
* elementwise (biases, gains): every element is its own neuron (``axes=None``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = ["NeuronLayout", "ELEMENTWISE", "ROWS"]


@dataclass(frozen=True)
class NeuronLayout:
    """How a tensor splits into neurons.

    axes: tensor axes that index neurons (negative allowed); ``None`` means every element is its
        own neuron.
    split_axis / groups: a fan-in axis whose ``groups`` equal blocks also index neurons (grouped
        transposed convolution: the input-channel axis).
    center: keep each neuron zero-mean (the paper's default; off for tiny fan-in where it is harmful).
    normalize: keep each neuron unit-norm. ``False`` gives per-neuron optimizer state without a
        constraint (embedding rows).
    """

    axes: tuple[int, ...] | None = (0,)
    split_axis: int | None = None
    groups: int = 1
    center: bool = True
    normalize: bool = True

    def __post_init__(self):
        if self.axes is not None:
            object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.groups > 1 and self.split_axis is None:
            raise ValueError("groups > 1 needs split_axis (the fan-in axis the groups split)")
        if self.axes is None and (self.center or self.normalize):
            # An elementwise layout cannot be centred or normalised: each "neuron" is one number.
            object.__setattr__(self, "center", False)
            object.__setattr__(self, "normalize", False)

    # ---- descriptive helpers -------------------------------------------------------------
    @property
    def elementwise(self) -> bool:
        return self.axes is None

    @property
    def constrained(self) -> bool:
        return self.normalize or self.center

    def with_(self, **kw) -> "NeuronLayout":
        return replace(self, **kw)

    def describe(self) -> str:
        if self.elementwise:
            return "elementwise"
        s = "axis " + ",".join(str(a) for a in self.axes)
        if self.groups > 1:
            s += f" (+{self.groups} groups of axis {self.split_axis})"
        return s

    # ---- geometry ------------------------------------------------------------------------
    def check(self, shape: torch.Size | tuple[int, ...]) -> None:
        """Raise ValueError if this layout does not fit a tensor of ``shape``."""
        nd = len(shape)
        if self.elementwise:
            return
        for a in self._all_axes(nd):
            if not -nd <= a < nd:
                raise ValueError(f"neuron axis {a} out of range for a tensor of shape {tuple(shape)}")
        if self.groups > 1:
            sa = self.split_axis % nd
            if sa in {a % nd for a in self.axes}:
                raise ValueError("split_axis must be a fan-in axis, not a neuron axis")
            if shape[sa] % self.groups:
                raise ValueError(f"axis {sa} of size {shape[sa]} does not split into {self.groups} groups")

    def _all_axes(self, nd: int) -> list[int]:
        out = list(self.axes or ())
        if self.split_axis is not None:
            out.append(self.split_axis)
        return out

    def neuron_view(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """A view of ``t`` and the dims of that view that hold one neuron's fan-in.

        Reductions over those dims with ``keepdim=True`` give one value per neuron that broadcasts
        back onto the view. The view shares memory with ``t`` (in-place ops on it update ``t``).
        """
        nd = t.dim()
        if self.elementwise:
            return t, ()
        axes = {a % nd for a in self.axes}
        if self.groups > 1:
            sa = self.split_axis % nd
            t = t.unflatten(sa, (self.groups, t.shape[sa] // self.groups))
            # axes after sa shift by one; the group index (at sa) becomes a neuron axis
            axes = {a + 1 if a > sa else a for a in axes} | {sa}
            nd += 1
        dims = tuple(d for d in range(nd) if d not in axes)
        if not dims:
            # every axis indexes neurons (fan-in 1): a trailing size-1 fan-in dim keeps reductions
            # per neuron (torch reads dim=() as "all dims")
            return t.unsqueeze(-1), (nd,)
        return t, dims

    def fan_in(self, shape) -> int:
        shape = tuple(shape)
        if self.elementwise:
            return 1
        nd = len(shape)
        axes = {a % nd for a in self.axes}
        n = math.prod(s for d, s in enumerate(shape) if d not in axes)
        return n // self.groups

    def num_neurons(self, shape) -> int:
        shape = tuple(shape)
        return max(1, math.prod(shape)) // max(1, self.fan_in(shape)) if shape else 1

    # ---- per-neuron maths, shared by the optimizer and the parametrization -------------
    def project_with_norms(self, t: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`project` plus each neuron's centred norm before normalising (keepdim, on the
        neuron view), in one pass of statistics."""
        if self.elementwise or not self.constrained:
            return t, None
        v, dims = self.neuron_view(t)
        if self.center:
            v = v - v.mean(dim=dims, keepdim=True)
        # norms in fp32: in fp16 the floor rounds to 0 and a zero neuron would become 0/0
        norms = torch.linalg.vector_norm(v, dim=dims, keepdim=True, dtype=_acc(v.dtype))
        if self.normalize:
            v = (v * (1.0 / norms.clamp_min(eps))).to(t.dtype)
        return v.reshape(t.shape), norms

    def project(self, t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
        """Out-of-place projection onto the balanced set (centre, then unit norm per neuron).

        Zero neurons stay zero (never NaN); :func:`nerofy.balanced.fill_dead_` gives them a
        direction where that is wanted.
        """
        return self.project_with_norms(t, eps)[0]


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for norms: at least fp32 (complex64 for complex tensors, whose norms
    ``vector_norm`` returns as real)."""
    if dtype.is_complex:
        return torch.promote_types(dtype, torch.complex64)
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 for statistics; complex tensors keep their imaginary part."""
    return t.to(_acc(t.dtype)) if t.dtype != _acc(t.dtype) else t


ELEMENTWISE = NeuronLayout(axes=None)
ROWS = NeuronLayout(axes=(0,))
