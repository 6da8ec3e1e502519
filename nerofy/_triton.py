"""Nero's step on the GPU in Triton: a few launches for all tensors of all groups, no host sync.

Why: the foreach path issues several kernels *per tensor* (norms, mean, centring, normalising) and
the launch cost dominates a GPU step. Here every neuron of every tensor is one row of a *neuron
table* (tensor index, offset of its first weight, offset of its ``v``), built once per model
structure and kept on the device. A per-tensor table (pointers, fan-in shape, step coefficients)
goes to the device with one copy per step. One program loads a block of neuron rows (gathered
through the tables, so rows of different tensors share a program), computes ``||g||^2``, ``v``, the
step, the mean and the norm in registers and writes the balanced rows back: one read of ``w`` and
``g``, one write of ``w``, for every layout nerofy makes.

A neuron's fan-in is addressed as ``(k // L1) * S1 + (k % L1) * S0`` for ``k < L``: rows
(``S0 = 1``), ``(in, out)`` columns (``S0 = out``), ConvTranspose's ``(in, out, *k)`` output channels
(``L1 = prod(k)``, ``S1 = out * prod(k)``), grouped blocks, channels-last filters (the order of a
neuron's weights does not matter, so fan-in dims are sorted by stride and merged). A layout whose
fan-in needs more than two levels takes the foreach path.

Launches per step: one per (parameter dtype, fan-in bucket) present, the buckets being fan-in
<= 16, 128, 1024, 4096 (one register block per neuron row) and larger (a 4-pass loop over blocks
that recomputes ``w - c g`` instead of storing it, so bf16/fp16 weights are rounded once), plus one
for elementwise tensors. fp32/bf16/fp16 weights and gradients; ``v`` and all arithmetic in fp32.

Non-finite gradients are masked in the kernel (a neuron whose ``||g||^2`` is not finite, or an
element, steps as with a zero gradient) and counted with an atomic add into a device counter that
only :meth:`nerofy.Nero.skipped` reads. In capturable mode the kernel reads ``lr`` and each tensor's
step from device memory and computes the bias correction itself, so nothing moves from the host
per step (the tables are uploaded only when the tensors' addresses change).

Triton is imported on first use only. ``TRITON_INTERPRET=1`` (set before triton is imported) runs
the kernels on CPU tensors: the tests do that on machines without a GPU (``tests/conftest.py`` sets
it, the tests set ``ON_CPU``).
"""
from __future__ import annotations

import math
import os
import struct
from array import array
from functools import lru_cache

import torch
from torch import Tensor

from .layout import NeuronLayout

__all__ = ["available", "unavailable_reason", "interpreted", "takes", "TritonStep", "ON_CPU", "stats"]

ON_CPU = False  # tests: route CPU tensors here too (meaningful only under TRITON_INTERPRET=1)
stats = {"launches": 0}  # kernel launches so far (the dispatch-count test and benchmark read it)
_launching = False  # True while a kernel is launched (the interpreter's own tensor copies are not ours)

_BUCKETS = ((16, 256), (128, 32), (1024, 4), (4096, 1))  # (block of fan-in K, neuron rows per program)
_LOOP_K = 4096  # block size of the looped kernel for fan-in > 4096
_EW_BLOCK = 1024  # elements per program of the elementwise kernel
_COLS = 17  # int64 columns of the per-tensor table
# per-tensor columns: 0 w ptr, 1 g ptr, 2 v ptr, 3 L, 4 L1, 5 S0, 6 S1, 7 flags,
# 8 lr*s (or s when capturable), 9 1/(1-beta^t), 10 beta, 11 eps, 12 lr ptr (capturable), 13 log(beta),
# 14 1-beta, 15 1/clip (0: no cap), 16 1/(1-beta^(t-1)) (0 at t = 1; v's limit, see optim._update_v)
# (floats are stored as their float64 bit patterns)
_CENTER, _NORMALIZE, _SKIP, _CLIP_V = 1, 2, 4, 8
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _import():
    """The kernels, or (None, why not). Compiled or interpreted is fixed for the process when triton
    is first imported: ``TRITON_INTERPRET`` is read then, also by triton's own library functions
    (``tl.sum``, ...), so a later change of the variable cannot switch modes."""
    try:
        import importlib

        mod = importlib.import_module("nerofy._triton_kernels")
    except Exception as e:  # not installed, or broken for this platform
        return None, f"triton is not importable ({type(e).__name__}: {e})"
    return {"neurons": mod.neurons, "loop": mod.loop, "elements": mod.elements}, None


def interpreted() -> bool:
    """Whether the kernels run under triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    if _import()[0] is None:
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def available() -> bool:
    return _import()[0] is not None


def unavailable_reason() -> str | None:
    return _import()[1]


def _device_ok(t: Tensor) -> bool:
    return t.device.type == "cuda" or (ON_CPU and t.device.type == "cpu")


def disabled() -> bool:
    """``NEROFY_DISABLE_TRITON=1``: the GPU step takes the foreach path (an escape hatch that needs
    no code change)."""
    return os.environ.get("NEROFY_DISABLE_TRITON", "").strip().lower() not in ("", "0", "false", "no")


def takes(p: Tensor, lay: NeuronLayout, v: Tensor) -> bool:
    """Whether the Triton step can update ``p`` with its state ``v`` (cheap, host-side checks)."""
    g = p.grad
    if not _device_ok(p) or disabled() or g is None or g.device != p.device or v.device != p.device:
        return False
    if type(p) not in (Tensor, torch.nn.Parameter) or type(g) is not Tensor or type(v) is not Tensor:  # DTensor, ...
        return False
    if p.dtype not in _DTYPES or g.dtype not in _DTYPES or v.dtype != torch.float32 or g.shape != p.shape:
        return False
    if not _dense(tuple(p.shape), tuple(p.stride())):  # g and v are then allocated with p's strides
        return False
    if lay.elementwise:
        ok = v.shape == p.shape and v.stride() == p.stride()
    else:
        ok = (_fan_in_levels(lay, tuple(p.shape), tuple(p.stride())) is not None
              and _v_fits(lay, tuple(p.shape), tuple(p.stride()), tuple(v.shape)))
    return ok and available()


@lru_cache(maxsize=4096)
def _dense(shape: tuple, stride: tuple) -> bool:
    """Non-overlapping and dense: some order of the dims is a contiguous layout."""
    expected = 1
    for s, n in sorted((s, n) for s, n in zip(stride, shape) if n > 1):
        if s != expected:
            return False
        expected *= n
    return True


@lru_cache(maxsize=4096)
def _v_fits(lay: NeuronLayout, shape: tuple, stride: tuple, v_shape: tuple) -> bool:
    wv, dims = lay.neuron_view(torch.empty_strided(shape, stride, device="meta"))
    return v_shape == tuple(1 if d in dims else n for d, n in enumerate(wv.shape))


@lru_cache(maxsize=4096)
def _fan_in_levels(lay: NeuronLayout, shape: tuple, stride: tuple):
    """(L, L1, S0, S1) addressing one neuron's fan-in of a tensor of ``shape``/``stride`` under
    ``lay``, or None when it needs more than two (size, stride) levels or neurons overlap."""
    t = torch.empty_strided(shape, stride, device="meta")
    wv, dims = lay.neuron_view(t)
    levels = sorted((wv.stride(d), wv.size(d)) for d in dims if wv.size(d) > 1)
    merged: list[list[int]] = []
    for s, n in levels:  # sort by stride, then merge dims that continue each other in memory
        if merged and merged[-1][0] * merged[-1][1] == s:
            merged[-1][1] *= n
        else:
            merged.append([s, n])
    if len(merged) > 2:
        return None
    if not merged:
        return 1, 1, 0, 0
    if len(merged) == 1:
        (s0, n0), = merged
        return n0, n0, s0, 0
    (s0, n0), (s1, n1) = merged
    return n0 * n1, n0, s0, s1


def _neuron_offsets(lay: NeuronLayout, w: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
    """Per neuron: the element offset of its first fan-in weight in ``w`` and of its value in
    ``v`` (both relative to the tensors' data pointers), or None if ``v`` does not fit."""
    wv, dims = lay.neuron_view(torch.empty_strided(w.shape, w.stride(), device="meta"))
    keep = tuple(1 if d in dims else n for d, n in enumerate(wv.shape))
    if tuple(v.shape) != keep:
        return None
    ow = torch.zeros(keep, dtype=torch.int64)
    ov = torch.zeros(keep, dtype=torch.int64)
    for d, n in enumerate(keep):
        if d in dims or n == 1:
            continue
        shape = [1] * len(keep)
        shape[d] = n
        idx = torch.arange(n, dtype=torch.int64).view(shape)
        ow = ow + idx * wv.stride(d)
        ov = ov + idx * v.stride(d)
    return ow.flatten(), ov.flatten()


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------
class TritonStep:
    """The tables for one optimizer, rebuilt when the set, shapes, strides or state of its
    tensors change; :meth:`run` does one step over a list of items."""

    def __init__(self):
        self._key = None
        self._ptrs = None  # capturable: the uploaded table is reused while these stay the same

    def _build(self, items, device, capturable):
        """Static part of the tables: fan-in addressing, flags, the neuron tables per launch."""
        static = array("q", bytes(8 * _COLS * len(items)))
        launches: dict[tuple, list] = {}
        for i, (w, g, v, lay, group, st) in enumerate(items):
            c = _COLS * i
            if lay.elementwise:
                n = w.numel()
                static[c + 3], static[c + 4] = n, n
                starts = torch.arange(0, n, _EW_BLOCK, dtype=torch.int64)
                rows = torch.stack([torch.full_like(starts, i), starts], 1)
                launches.setdefault((w.dtype, g.dtype, "elements", _EW_BLOCK, 1), []).append(rows)
            else:
                L, L1, S0, S1 = _fan_in_levels(lay, tuple(w.shape), tuple(w.stride()))
                static[c + 3], static[c + 4], static[c + 5], static[c + 6] = L, L1, S0, S1
                static[c + 7] = (_CENTER if lay.center else 0) | (_NORMALIZE if lay.normalize else 0)
                ow, ov = _neuron_offsets(lay, w, v)
                rows = torch.stack([torch.full_like(ow, i), ow, ov], 1)
                bucket = next(((k, r) for k, r in _BUCKETS if L <= k), None)
                kind = ("neurons", *bucket) if bucket else ("loop", _LOOP_K, 1)
                launches.setdefault((w.dtype, g.dtype, *kind), []).append(rows)
            if group["skip_nonfinite"]:
                static[c + 7] |= _SKIP
            if group.get("clip_v", True):
                static[c + 7] |= _CLIP_V
            beta = group["beta"]
            static[c + 10] = _f64_bits(beta)
            static[c + 11] = _f64_bits(group["eps"])
            static[c + 13] = _f64_bits(math.log(beta) if beta > 0 else -math.inf)
            static[c + 14] = _f64_bits(1.0 - beta)
            static[c + 15] = _f64_bits(_clip_inv(group, w))
        self._static = static
        self._launches = [(key, torch.cat(rows).contiguous().to(device)) for key, rows in launches.items()]
        self._ptrs = None

    def run(self, items, counter: Tensor, capturable: bool) -> None:
        """One step. ``items``: (w, g, v, layout, group, state) with ``w``/``g`` the parameter and its
        gradient as they are (any of fp32/bf16/fp16) and ``v`` fp32. Non-capturable: ``state["step"]``
        is a Python int, already incremented. Capturable: a 0-dim fp32 device tensor, incremented here.
        ``counter``: an int64 device tensor of one element that the skipped count is added to."""
        kern = _import()[0]
        device = items[0][0].device
        g_fix = []
        for j, (w, g, v, lay, group, st) in enumerate(items):
            if g.stride() != w.stride():  # the kernel addresses g like w
                g = torch.empty_like(w, dtype=g.dtype).copy_(g)
                g_fix.append(g)
                items[j] = (w, g, v, lay, group, st)
        key = tuple((w.shape, w.stride(), w.dtype, g.dtype, v.shape, v.stride(), lay, id(group),
                     group["beta"], group["eps"], group["skip_nonfinite"], _clip_inv(group, w), group.get("clip_v", True))
                    for w, g, v, lay, group, st in items)
        if key != self._key:
            self._build(items, device, capturable)
            self._key = key
            self._steps = None
        if capturable:
            table, steps = self._capturable_tables(items, device)
        else:
            table, steps = self._eager_table(items, device), counter  # steps unused: any pointer
        global _launching
        _launching = True
        try:
            for (wdt, gdt, kind, K, R), rows in self._launches:
                fn = {"neurons": kern["neurons"], "loop": kern["loop"], "elements": kern["elements"]}[kind]
                n = rows.shape[0]
                grid = (triton_cdiv(n, R),)
                fn[grid](rows, table, steps, counter, n, W=_tl(wdt), G=_tl(gdt), R=R, K=K, CAPT=capturable,
                         num_warps=8 if K * R >= 4096 else 4)
                stats["launches"] += 1
        finally:
            _launching = False
        if capturable:
            steps.add_(1.0)  # one kernel for every tensor's step counter (the state holds views)

    def _eager_table(self, items, device) -> Tensor:
        """The per-tensor table with this step's pointers and coefficients, in one host->device copy."""
        buf = array("q", self._static)
        for i, (w, g, v, lay, group, st) in enumerate(items):
            c = _COLS * i
            buf[c], buf[c + 1], buf[c + 2] = w.data_ptr(), g.data_ptr(), v.data_ptr()
            beta, t = group["beta"], st["step"]
            buf[c + 8] = _f64_bits(float(group["lr"]) * st["scale"])
            buf[c + 9] = _f64_bits(1.0 / (1.0 - beta ** t))
            buf[c + 16] = _f64_bits(_prev_correction(t, beta))
        host = torch.frombuffer(buf, dtype=torch.int64)
        if device.type == "cpu":
            return host.clone()  # (tests) the buffer must outlive the step like a device copy does
        return host.pin_memory().to(device, non_blocking=True)

    def _capturable_tables(self, items, device) -> tuple[Tensor, Tensor]:
        """Capturable: the table holds pointers to ``lr`` and the scales; steps live in one device
        tensor whose elements the states hold as views. Uploaded only when pointers change."""
        if self._steps is None or any(st["step"] is not s for (*_, st), s in zip(items, self._step_views)):
            # gather the current counters into one tensor (a device op, no sync) and hand out views
            self._steps = torch.stack([_as_step(st["step"], device) for *_, st in items]).reshape(-1)
            self._step_views = self._steps.unbind(0)
            for (*_, st), s in zip(items, self._step_views):
                st["step"] = s
            self._lr = {}
            self._ptrs = None
        lr_ptrs = []
        for *_, group, st in items:
            lr = group["lr"]
            if isinstance(lr, Tensor) and lr.device == device and lr.dtype == torch.float32 and lr.numel() == 1:
                lr_ptrs.append(lr.data_ptr())  # the user's tensor: updating it in place needs no upload
                continue
            buf = self._lr.get(id(group))
            if buf is None:
                buf = self._lr[id(group)] = [torch.zeros((), dtype=torch.float32, device=device), None]
            if isinstance(lr, Tensor):
                buf[0].copy_(lr.reshape(()))  # device-side copy (a CPU tensor: a host->device copy)
            elif buf[1] != lr:
                buf[0].fill_(lr)  # a new float lr (the first step, or a scheduler): one small kernel
                buf[1] = lr
            lr_ptrs.append(buf[0].data_ptr())
        ptrs = [(w.data_ptr(), g.data_ptr(), v.data_ptr(), lp, st["scale"])
                for (w, g, v, lay, group, st), lp in zip(items, lr_ptrs)]
        if ptrs != self._ptrs:
            buf = array("q", self._static)
            for i, (wp, gp, vp, lp, s) in enumerate(ptrs):
                c = _COLS * i
                buf[c], buf[c + 1], buf[c + 2], buf[c + 12] = wp, gp, vp, lp
                buf[c + 8] = _f64_bits(s)
            host = torch.frombuffer(buf, dtype=torch.int64)
            self._table = host.clone() if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)
            self._ptrs = ptrs
        return self._table, self._steps


def _clip_inv(group: dict, p: Tensor) -> float:
    from .optim import clip_inv  # optim imports this module at its top

    return clip_inv(group, p)


def _prev_correction(t: int, beta: float) -> float:
    from .optim import _prev_correction

    return _prev_correction(t, beta)


def _as_step(s, device) -> Tensor:
    if isinstance(s, Tensor):
        return s.detach().to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(s), dtype=torch.float32, device=device)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tl(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
