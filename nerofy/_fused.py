"""A fused CPU kernel for Nero's step: one pass per neuron instead of one pass per operation.

Why: on CPU the step is memory-bound. The multi-tensor (foreach) path streams every weight and
gradient through memory several times (gradient norms, the step, centring, normalising). A
neuron's fan-in is small (a few thousand floats at most in common models) and, for the usual
layouts, contiguous in memory, so one pass over each neuron can do everything while the neuron
sits in L1/L2:

1. ``||g_i||^2`` (reads the gradient row from memory);
2. ``v_i``, the step coefficient, ``w_i += c_i * g_i`` while accumulating ``sum(w_i)`` and
   ``sum(w_i^2)`` (reads the weight row; the gradient row is still in cache);
3. centre and normalise the row from cache (``||w - m||^2 = sum(w^2) - m * sum(w)``, recomputed in
   a second in-cache pass when that subtraction would cancel, e.g. far-from-centred neurons).

The kernel is plain C (GCC/Clang vector extensions, OpenMP over neurons), compiled once per
machine with the system C compiler into a cache folder and loaded with ``ctypes``: no torch headers,
no ninja, well under a second to build. Where no compiler is found, the build fails, or a tensor
does not fit (not CPU, not fp32, a neuron that is not one contiguous block of memory), the caller
uses the foreach path instead.

Environment: ``NEROFY_CACHE_DIR`` (where the compiled kernel is kept; default
``$XDG_CACHE_HOME/nerofy`` or ``~/.cache/nerofy``), ``NEROFY_DISABLE_FUSED=1`` (never build or use it),
``CC`` (the compiler).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from functools import lru_cache

import torch
from torch import Tensor

from .layout import NeuronLayout

log = logging.getLogger("nerofy")

__all__ = ["available", "unavailable_reason", "partition", "run", "build_info"]

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));   /* unaligned load/store */
#define LD(p) (*(const v8u*)(p))
#define ST(p, x) (*(v8u*)(p) = (x))

typedef struct { int64_t t, a, b; } task_t;

static inline double hsum(v8 a) { double s = 0.0; for (int j = 0; j < 8; j++) s += a[j]; return s; }

/* One Nero step over n tensors.
   meta (int64, 6 per tensor): weight ptr, grad ptr, v ptr, rows, cols, flags.
     cols == 0: elementwise tensor of `rows` elements (v per element, no constraint);
     else `rows` neurons of `cols` contiguous floats each, v per neuron; flags: 1 centre, 2 normalise.
   fmeta (double, 3 per tensor): lr * scale, 1 / (1 - beta^step), 1 / (1 - beta^(step-1)) (0 at step 1).
   clipinv: 1 / clip (0: none): the denominator is at least ||g|| * clipinv (|g| per element).
   vclipinv: v takes ||g||^2 at most vclip^2 * v_hat of the step before, where that v is not 0
   (0: no limit).
   Returns the number of neurons/elements whose non-finite gradient was treated as zero. */
int64_t nero_fused_step(int64_t n, const int64_t* meta, const double* fmeta, double beta, double eps,
                        double clipinv, double vclipinv, int skip, int nthreads, int64_t chunk_bytes) {
    int64_t ntasks = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t rows = meta[6*i+3], cols = meta[6*i+4];
        int64_t per = cols ? chunk_bytes / (cols * 4) : chunk_bytes / 4;
        if (per < 1) per = 1;
        ntasks += (rows + per - 1) / per;
    }
    task_t* tasks = (task_t*)malloc(sizeof(task_t) * (ntasks ? ntasks : 1));
    if (!tasks) return -1;
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t rows = meta[6*i+3], cols = meta[6*i+4];
        int64_t per = cols ? chunk_bytes / (cols * 4) : chunk_bytes / 4;
        if (per < 1) per = 1;
        for (int64_t a = 0; a < rows; a += per) {
            tasks[k].t = i; tasks[k].a = a; tasks[k].b = a + per < rows ? a + per : rows; k++;
        }
    }
    const float fb = (float)beta, f1b = (float)(1.0 - beta), feps = (float)eps, fci = (float)clipinv;
    const float fc2 = vclipinv > 0.0 ? (float)(1.0 / (vclipinv * vclipinv)) : 0.0f;   /* vclip^2 */
    int64_t skipped = 0;
#ifdef _OPENMP
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(+:skipped) if(nthreads > 1)
#endif
    for (int64_t j = 0; j < ntasks; j++) {
        const int64_t i = tasks[j].t;
        float* w = (float*)(intptr_t)meta[6*i];
        const float* g = (const float*)(intptr_t)meta[6*i+1];
        float* v = (float*)(intptr_t)meta[6*i+2];
        const int64_t cols = meta[6*i+4], flags = meta[6*i+5];
        const float lrs = (float)fmeta[3*i], bc = (float)fmeta[3*i+1], lim = fc2 * (float)fmeta[3*i+2];
        if (cols == 0) {                                   /* elementwise */
            for (int64_t e = tasks[j].a; e < tasks[j].b; e++) {
                float gi = g[e];
                if (skip && !isfinite(gi)) { gi = 0.0f; skipped++; }
                float si = gi * gi;
                if (fc2 > 0.0f && v[e] > 0.0f && si > lim * v[e]) si = lim * v[e];
                float vi = fb * v[e] + f1b * si;
                v[e] = vi;
                float d = sqrtf(vi * bc);
                d = d < feps ? feps : d;
                const float dc = fabsf(gi) * fci;
                d = d < dc ? dc : d;
                w[e] -= lrs * gi / d;
            }
            continue;
        }
        const int64_t n32 = cols & ~(int64_t)31, n16 = cols & ~(int64_t)15, n8 = cols & ~(int64_t)7;
        for (int64_t r = tasks[j].a; r < tasks[j].b; r++) {
            float* wr = w + r * cols;
            const float* gr = g + r * cols;
            /* 1. squared gradient norm */
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            int64_t c = 0;
            for (; c < n32; c += 32) {
                v8 x0 = LD(gr+c), x1 = LD(gr+c+8), x2 = LD(gr+c+16), x3 = LD(gr+c+24);
                a0 += x0 * x0; a1 += x1 * x1; a2 += x2 * x2; a3 += x3 * x3;
            }
            for (; c < n8; c += 8) { v8 x0 = LD(gr+c); a0 += x0 * x0; }
            double ss = hsum((a0 + a1) + (a2 + a3));
            for (; c < cols; c++) ss += (double)gr[c] * gr[c];
            float sq = (float)ss;
            const int bad = skip && !isfinite(sq);
            if (bad) { sq = 0.0f; skipped++; }
            /* 2. second moment (of the gradient clipped at clip * its rms), step, running sums of the new row */
            const float sv = (fc2 > 0.0f && v[r] > 0.0f && sq > lim * v[r]) ? lim * v[r] : sq;
            const float vi = fb * v[r] + f1b * sv;
            v[r] = vi;
            float d = sqrtf(vi * bc);
            d = d < feps ? feps : d;
            const float dc = sqrtf(sq) * fci;
            d = d < dc ? dc : d;
            const float cf = -lrs / d;
            const v8 cv = cf - (v8){0};
            v8 s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};
            c = 0;
            if (!bad) {
                for (; c < n16; c += 16) {
                    /* start fetching the next row while this one is in cache: ~6% at 1 thread
                       (prefetches never fault, so running past the tensor's end is harmless) */
                    __builtin_prefetch(gr + cols + c, 0, 3);
                    __builtin_prefetch(wr + cols + c, 1, 3);
                    v8 x0 = LD(wr+c) + cv * LD(gr+c), x1 = LD(wr+c+8) + cv * LD(gr+c+8);
                    ST(wr+c, x0); ST(wr+c+8, x1);
                    s0 += x0; s1 += x1; q0 += x0 * x0; q1 += x1 * x1;
                }
            } else {
                for (; c < n16; c += 16) {
                    v8 x0 = LD(wr+c), x1 = LD(wr+c+8);
                    s0 += x0; s1 += x1; q0 += x0 * x0; q1 += x1 * x1;
                }
            }
            double sum = hsum(s0 + s1), s2 = hsum(q0 + q1);
            for (; c < cols; c++) {
                float x = bad ? wr[c] : wr[c] + cf * gr[c];
                wr[c] = x; sum += x; s2 += (double)x * x;
            }
            /* 3. centre and normalise from cache */
            float mean = 0.0f;
            if (flags & 1) {
                const double m = sum / (double)cols;
                double var = s2 - m * sum;                 /* ||w - m||^2 */
                mean = (float)m;
                if ((flags & 2) && !(var > 0.5 * s2)) {     /* cancellation: exact second pass */
                    const v8 mv = mean - (v8){0};
                    q0 = (v8){0};
                    for (c = 0; c < n8; c += 8) { v8 x = LD(wr+c) - mv; q0 += x * x; }
                    var = hsum(q0);
                    for (; c < cols; c++) { float x = wr[c] - mean; var += (double)x * x; }
                }
                s2 = var;
            }
            if (flags & 2) {
                float nrm = (float)sqrt(s2 > 0.0 ? s2 : 0.0);
                if (isnan(s2)) nrm = (float)s2;
                nrm = nrm < 1e-12f ? 1e-12f : nrm;
                const float inv = 1.0f / nrm;
                const v8 mv = mean - (v8){0}, iv = inv - (v8){0};
                for (c = 0; c < n8; c += 8) ST(wr+c, (LD(wr+c) - mv) * iv);
                for (; c < cols; c++) wr[c] = (wr[c] - mean) * inv;
            } else if (flags & 1) {
                const v8 mv = mean - (v8){0};
                for (c = 0; c < n8; c += 8) ST(wr+c, LD(wr+c) - mv);
                for (; c < cols; c++) wr[c] -= mean;
            }
        }
    }
    free(tasks);
    return skipped;
}

int nero_fused_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
"""

_CHUNK_BYTES = 1 << 16  # work per OpenMP task: small enough to balance, large enough to amortise

_lock = threading.Lock()
_PARALLEL_MIN_ELEMENTS = 1 << 18  # below ~1 MiB of fp32 weights a step runs on one thread
_state: dict = {}


def _disabled() -> bool:
    return os.environ.get("NEROFY_DISABLE_FUSED", "").strip().lower() not in ("", "0", "false", "no")


def _cache_dir() -> str:
    d = os.environ.get("NEROFY_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "nerofy")
    return d


def _compiler() -> list[str] | None:
    for cand in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if not cand:
            continue
        argv = shlex.split(cand)
        if argv and shutil.which(argv[0]):
            return argv
    return None


def _cpu_id() -> str:
    """What -march=native depends on: a kernel built for one CPU must not load on another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f.read().splitlines() if l.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> tuple[ctypes.CDLL | None, str | None, dict]:
    info: dict = {}
    if sys.platform == "win32":
        return None, "the fused kernel is not built on Windows", info
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC)", info
    try:
        ver = subprocess.run(cc + ["--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler {cc[0]} does not run: {e}", info
    base = ["-O3", "-fPIC", "-shared", "-std=gnu99"]
    # with and without -march=native / OpenMP: the first combination that builds wins
    variants = [["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []]
    d = _cache_dir()
    try:
        os.makedirs(d, exist_ok=True)
        if not os.access(d, os.W_OK):
            raise OSError(f"{d} is not writable")
    except OSError:
        d = os.path.join(tempfile.gettempdir(), f"nerofy-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
        os.makedirs(d, exist_ok=True)
    errors = []
    for extra in variants:
        key = hashlib.sha256("\0".join([_SOURCE, " ".join(cc), ver, " ".join(base + extra), _cpu_id(),
                                        platform.platform()]).encode()).hexdigest()[:16]
        so = os.path.join(d, f"nero_fused_{key}.so")
        t0 = time.perf_counter()
        if not os.path.exists(so):
            src = os.path.join(d, f"nero_fused_{key}.{os.getpid()}.c")
            tmp = so + f".{os.getpid()}.tmp"
            try:
                with open(src, "w") as f:
                    f.write(_SOURCE)
                r = subprocess.run(cc + base + extra + [src, "-o", tmp, "-lm"], capture_output=True, text=True,
                                   timeout=120)
                if r.returncode != 0:
                    errors.append(f"{' '.join(extra) or 'plain'}: {r.stderr.strip()[-300:]}")
                    continue
                os.replace(tmp, so)  # atomic: concurrent builders never load a half-written file
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(str(e))
                continue
            finally:
                for p in (src, tmp):
                    try:
                        os.remove(p)
                    except OSError:
                        pass
            info["compiled"] = True
        info["build_s"] = time.perf_counter() - t0
        try:
            lib = ctypes.CDLL(so)
            fn = lib.nero_fused_step
        except (OSError, AttributeError) as e:
            errors.append(f"loading {so}: {e}")
            continue
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double, ctypes.c_double,
                       ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
        lib.nero_fused_has_openmp.restype = ctypes.c_int
        info.update(path=so, flags=" ".join(base + extra), compiler=cc[0], openmp=bool(lib.nero_fused_has_openmp()))
        return lib, None, info
    return None, "building the fused kernel failed: " + " | ".join(errors), info


def _load() -> dict:
    if not _state:
        with _lock:
            if not _state:
                if _disabled():
                    lib, why, info = None, "NEROFY_DISABLE_FUSED is set", {}
                else:
                    lib, why, info = _build()
                if why:
                    log.debug("nerofy fused kernel unavailable: %s", why)
                _state.update(lib=lib, why=why, info=info)
    return _state


def available() -> bool:
    """Whether the fused CPU kernel is built (building it on first call)."""
    return _load()["lib"] is not None


def unavailable_reason() -> str | None:
    return _load()["why"]


def build_info() -> dict:
    """Where the kernel lives, the flags it was built with, whether it has OpenMP, build time."""
    return dict(_load()["info"])


# ---------------------------------------------------------------------------------------------
# which tensors the kernel can take
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _rows_cols(layout: NeuronLayout, shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int] | None:
    """(neurons, fan-in) if every neuron of a tensor with this shape/stride is one contiguous block of
    memory, the blocks are dense and ordered like the neurons (so ``v`` lines up); else None.

    Covers axis-0 layouts of contiguous and channels-last weights, leading multi-axis layouts and
    grouped layouts whose groups lie before the fan-in in memory. Elementwise: (numel, 0) if dense.
    """
    numel = math.prod(shape)
    if numel == 0:
        return None
    meta = torch.empty_strided(shape, stride, device="meta")
    if layout.elementwise:
        nv, fdims = meta, ()
    else:
        nv, fdims = layout.neuron_view(meta)
    size, st = nv.shape, nv.stride()
    dims = [d for d in range(nv.dim()) if size[d] != 1]
    order = sorted(dims, key=lambda d: -st[d])
    expected = 1
    for d in reversed(order):  # dense, non-overlapping
        if st[d] != expected:
            return None
        expected *= size[d]
    if layout.elementwise:
        return numel, 0
    fset = set(fdims)
    kinds = [d in fset for d in order]
    if any(kinds[i] and not kinds[i + 1] for i in range(len(kinds) - 1)):
        return None  # a neuron axis varies faster in memory than a fan-in axis
    nd = [d for d in order if d not in fset]
    if nd != sorted(nd):
        return None  # neurons not in the order of v
    cols = math.prod(size[d] for d in fdims)
    if cols == 0:
        return None
    return numel // cols, cols


_F32 = torch.float32
_ELEMENTWISE = NeuronLayout(axes=None)


def _why_not(w: Tensor, g: Tensor, v: Tensor) -> str | None:
    if any(type(t) is not Tensor for t in (w, g, v)):
        # tensor subclasses (FSDP2's DTensor, fake tensors): their data_ptr is not the data
        return f"tensor subclass {type(w).__name__ if type(w) is not Tensor else type(g).__name__}"
    if not (w.is_cpu and g.is_cpu and v.is_cpu):
        return f"device {w.device.type if not w.is_cpu else g.device.type}"
    if w.dtype != _F32 or g.dtype != _F32 or v.dtype != _F32:
        return f"dtype {w.dtype if w.dtype != _F32 else g.dtype}"
    return None


def partition(neurons: list, elements: list):
    """Split Nero's work lists into (fused_neurons, fused_elements, rest_neurons, rest_elements, why),
    ``why`` naming why the first of the rest cannot use the kernel (None when all can)."""
    fn, fe, rn, re_, why = [], [], [], [], None
    for item in neurons:
        w, g, v, lay, _, _ = item
        if w.numel() == 0:
            continue  # nothing to update
        r = _why_not(w, g, v)
        if r is None:
            stride = w.stride()
            if g.stride() != stride:
                r = "gradient strides differ from the weight's"
            else:
                rc = _rows_cols(lay, tuple(w.shape), stride)
                if rc is None:
                    r = f"layout {lay.describe()} of a {tuple(w.shape)} tensor: neurons are not contiguous in memory"
                elif v.numel() != rc[0] or not v.is_contiguous():
                    r = "state v is not contiguous"
                else:
                    fn.append((w, g, v, rc, lay, item[4], item[5]))
                    continue
        rn.append(item)
        why = why or r
    for item in elements:
        w, g, v, _, _ = item
        if w.numel() == 0:
            continue
        r = _why_not(w, g, v)
        if r is None:
            stride = w.stride()
            if g.stride() != stride or v.stride() != stride:
                r = "gradient or state strides differ from the weight's"
            elif not w.is_contiguous() and _rows_cols(_ELEMENTWISE, tuple(w.shape), stride) is None:
                r = "tensor is not dense in memory"
            else:
                fe.append(item)
                continue
        re_.append(item)
        why = why or r
    return fn, fe, rn, re_, why


def run(fused_neurons: list, fused_elements: list, *, lr: float, beta: float, eps: float,
        skip_nonfinite: bool = True, clip_inv: float = 0.0, v_clip_inv: float | None = None) -> int:
    """Apply the step to lists made by :func:`partition`. Returns the number of neurons/elements
    whose non-finite gradient was treated as zero."""
    lib = _load()["lib"]
    if lib is None:
        raise RuntimeError(f"nerofy fused kernel unavailable: {unavailable_reason()}")
    n = len(fused_neurons) + len(fused_elements)
    if n == 0:
        return 0
    from .optim import _prev_correction  # optim imports this module lazily, never at its top

    lr = float(lr)
    meta: list[int] = []
    fmeta: list[float] = []
    for w, g, v, (rows, cols), lay, t, s in fused_neurons:
        meta += (w.data_ptr(), g.data_ptr(), v.data_ptr(), rows, cols, int(lay.center) | 2 * int(lay.normalize))
        fmeta += (lr * s, 1.0 / (1.0 - beta ** t), _prev_correction(t, beta))
    for w, g, v, t, s in fused_elements:
        meta += (w.data_ptr(), g.data_ptr(), v.data_ptr(), w.numel(), 0, 0)
        fmeta += (lr * s, 1.0 / (1.0 - beta ** t), _prev_correction(t, beta))
    mt = torch.tensor(meta, dtype=torch.int64)
    ft = torch.tensor(fmeta, dtype=torch.float64)
    total = sum(r * c for *_, (r, c), _l, _t, _s in fused_neurons) + sum(w.numel() for w, *_ in fused_elements)
    # small steps stay on one thread: waking a team costs more than the work, and far more when
    # the cores are busy (threads then wait for a core at every barrier)
    threads = 1 if total < _PARALLEL_MIN_ELEMENTS else max(1, torch.get_num_threads())
    v_clip_inv = min(clip_inv, 1.0) if v_clip_inv is None else v_clip_inv  # optim.v_limit
    skipped = lib.nero_fused_step(n, mt.data_ptr(), ft.data_ptr(), float(beta), float(eps), float(clip_inv),
                                  float(v_clip_inv), int(bool(skip_nonfinite)),
                                  threads, _CHUNK_BYTES)
    if skipped < 0:
        raise MemoryError("nerofy fused kernel: out of memory")
    return int(skipped)
