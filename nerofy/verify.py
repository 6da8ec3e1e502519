"""Verify neuron axes numerically: perturb one neuron's slice and check that only that neuron's
outputs of the consuming op change.

One forward (real tensors, no grad) records, per constrained parameter, the first contraction call
that consumes the parameter or a view of it (same storage). Replaying that single call with one
neuron perturbed in place gives the set of outputs that neuron reaches. Neurons are independent
exactly when those sets are disjoint and non-empty; a wrong axis (e.g. treating input columns as
neurons) makes every perturbation reach every output.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from . import rules as R
from .layout import upcast
from .plan import Plan
from .trace import _fn_name, call

CONTRACTIONS = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                "matmul", "rmatmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "inner", "tensordot",
                "einsum", "bilinear", "grouped_mm"}


@dataclass
class AxisCheck:
    name: str
    status: str  # ok | fail | unverified
    detail: str = ""
    op: str = ""


class _Capture(TorchFunctionMode):
    def __init__(self, storages: dict[int, str]):
        super().__init__()
        self.storages = storages
        self.calls: dict[str, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = R.canonical(_fn_name(func))
        if op in CONTRACTIONS:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    name = self.storages.get(_storage_key(t))
                    if name is not None and name not in self.calls:
                        self.calls[name] = (func, args, kwargs, op)
        return func(*args, **kwargs)


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:
        return -1


def _first_tensor(out):
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            return upcast(t)
    return None


@torch.no_grad()
def verify_axes(model: nn.Module, plan: Plan, inputs: tuple, neurons: int = 3, names: list[str] | None = None,
                sample: bool = False) -> dict[str, AxisCheck]:
    """Check the neuron axes of the plan's constrained parameters on a *plain* (unwrapped) model.

    ``sample=True`` checks one parameter per distinct (module type, shape, axes, centering): the
    repeated blocks of a big model share their rules, and each replay costs a layer's forward.
    The others are absent from the result (callers count them as sampled out)."""
    params = dict(model.named_parameters())
    targets = [e for e in plan if e.role == "neuron" and (names is None or e.name in names) and e.name in params]
    if sample:
        mods = dict(model.named_modules())
        seen, kept = set(), []
        for e in targets:
            owner, _, attr = e.name.rpartition(".")
            key = (type(mods.get(owner)).__name__, attr, tuple(params[e.name].shape), tuple(e.axes), e.center)
            if key not in seen:
                seen.add(key)
                kept.append(e)
        targets = kept
    storages = {_storage_key(params[e.name]): e.name for e in targets}
    cap = _Capture(storages)
    with cap:
        call(model, inputs)
    results = {}
    for e in targets:
        if e.name not in cap.calls:
            results[e.name] = AxisCheck(e.name, "unverified", "no contraction consumed it directly (or a copy of it)")
            continue
        func, args, kwargs, op = cap.calls[e.name]
        results[e.name] = _check_one(e, params[e.name], func, args, kwargs, op, neurons)
    return results


def _check_one(e, p: torch.Tensor, func, args, kwargs, op, k: int) -> AxisCheck:
    lay = e.layout()
    view, dims = lay.neuron_view(p.data)
    ndims = [d for d in range(view.dim()) if d not in dims]
    nshape = [view.shape[d] for d in ndims]
    n = 1
    for s in nshape:
        n *= s
    base = _first_tensor(func(*args, **kwargs))
    if base is None:
        return AxisCheck(e.name, "unverified", f"{op} gave no floating or complex output", op)
    saved = p.data.clone()
    gen = torch.Generator().manual_seed(0)
    tol = 1e-4 * (float(base.abs().max()) + 1e-6)

    def reach(i: int) -> torch.Tensor:
        idx = _unravel(i, nshape)
        sl = [slice(None)] * view.dim()
        for d, j in zip(ndims, idx):
            sl[d] = j
        part = view[tuple(sl)]
        scale = float(part.abs().max()) or 1.0
        part.add_(torch.randn(part.shape, generator=gen, dtype=torch.float32).to(part) * scale + scale)
        try:
            out = _first_tensor(func(*args, **kwargs))
        finally:
            p.data.copy_(saved)
        return (out - base).abs() > tol

    # A weight used in pieces (chunk, split) feeds this call with only some neurons: widen the
    # sample until two neurons that reach it are found.
    tried: dict[int, torch.Tensor] = {}
    for picks in (sorted({0, n // 2, n - 1}), sorted(set(range(0, n, max(1, n // 16))) | {n - 1})):
        for i in picks[: max(k, 17)]:
            if i not in tried:
                tried[i] = reach(i)
        live = {i: r for i, r in tried.items() if bool(r.any())}
        if len(live) >= 2 or n == 1:
            break
    if not live:
        return AxisCheck(e.name, "unverified", f"perturbing {len(tried)} neurons changed no output of {op}", op)
    for (i, a), (j, b) in itertools.combinations(sorted(live.items()), 2):
        if bool((a & b).any()):
            return AxisCheck(e.name, "fail", f"neurons {i} and {j} both change the same outputs of {op}: "
                                             f"axes {e.axes} are not independent output units", op)
    if len(live) < 2:
        return AxisCheck(e.name, "unverified", f"only neuron {next(iter(live))} of those tried reaches {op}", op)
    return AxisCheck(e.name, "ok", f"{len(live)} neurons reach disjoint outputs of {op}", op)


def _unravel(i: int, shape: list[int]) -> list[int]:
    out = []
    for s in reversed(shape):
        out.append(i % s)
        i //= s
    return list(reversed(out))
