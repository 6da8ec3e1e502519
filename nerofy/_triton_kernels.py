"""Nero's Triton kernels (see :mod:`nerofy._triton` for the tables they read).

Imported only by :func:`nerofy._triton._import`, on the first step that needs it, so that nerofy
never imports triton otherwise.

Per-tensor table row (int64, 17 columns; floats as float64 bit patterns): 0 w ptr, 1 g ptr, 2 v ptr,
3 L (fan-in, or numel), 4 L1, 5 S0, 6 S1 (fan-in element k sits at (k // L1) * S1 + (k % L1) * S0),
7 flags (1 centre, 2 normalise, 4 skip non-finite, 8 clip v's sample), 8 lr * s (capturable: s), 9 1 / (1 - beta^t),
10 beta, 11 eps, 12 lr ptr (capturable), 13 log(beta), 14 1 - beta, 15 1 / clip (0: none),
16 1 / (1 - beta^(t-1)) (0 at t = 1).
"""
import triton
import triton.language as tl


@triton.jit
def f64(p):
    return tl.load(p).to(tl.float64, bitcast=True).to(tl.float32)

@triton.jit
def one_minus_pow(lnb, t):
    # 1 - beta^t = -expm1(t log beta); a series where exp would cancel (early steps)
    x = t * lnb
    series = -x * (1.0 + x / 2.0 * (1.0 + x / 3.0 * (1.0 + x / 4.0 * (1.0 + x / 5.0 * (1.0 + x / 6.0 * (1.0 + x / 7.0))))))
    return tl.where(tl.abs(x) < 0.1, series, 1.0 - tl.exp(x))

@triton.jit
def coefs(t, tid, steps, flags, CAPT: tl.constexpr):
    """(lr * s, 1 / (1 - beta^step), beta, 1 - beta, eps, 1 / clip, max(clip, 1)^2 / (1 - beta^(step-1))) of
    the tensors in rows ``t`` of the table (1 - beta has its own column: from a float32 beta it would
    be 1e-5 off). The last is v's limit factor (see :func:`sample`), 0 where there is no cap or at step 1."""
    beta, omb, eps, ci = f64(t + 10), f64(t + 14), f64(t + 11), f64(t + 15)
    if CAPT:
        lr = tl.load(tl.load(t + 12).to(tl.pointer_type(tl.float32)))
        lrs = lr * f64(t + 8)
        prev = tl.load(steps + tid)  # steps taken before this one
        bc = 1.0 / one_minus_pow(f64(t + 13), prev + 1.0)
        bcp = tl.where(prev > 0.5, 1.0 / one_minus_pow(f64(t + 13), tl.maximum(prev, 1.0)), 0.0)
    else:
        lrs, bc, bcp = f64(t + 8), f64(t + 9), f64(t + 16)
    cv = tl.minimum(ci, 1.0)  # v takes the gradient clipped at max(clip, 1) times its rms (optim.v_limit)
    lim = tl.where(cv > 0.0, tl.where((flags & 8) != 0, bcp / tl.maximum(cv * cv, 1e-30), 0.0), 0.0)
    return lrs, bc, beta, omb, eps, ci, lim

@triton.jit
def sample(sq, v, lim):
    """What v takes: ||g||^2 clipped at max(clip, 1)^2 times v's bias-corrected value before this step,
    where there is a cap and v is not 0 (the first step, a neuron whose gradient was zero so far)."""
    return tl.where(v > 0.0, tl.minimum(sq, tl.where(lim > 0.0, lim * v, sq)), sq)

@triton.jit
def finite(x):
    return (x - x) == 0.0  # False for NaN and +-inf

@triton.jit
def neurons(rows, table, steps, cnt, n, W: tl.constexpr, G: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
            CAPT: tl.constexpr):
    """R neuron rows (of any tensors, fan-in <= K each) per program, all in registers."""
    r = tl.program_id(0) * R + tl.arange(0, R)
    rm = r < n
    tid = tl.load(rows + r * 3, mask=rm, other=0)
    base = tl.load(rows + r * 3 + 1, mask=rm, other=0)
    voff = tl.load(rows + r * 3 + 2, mask=rm, other=0)
    t = table + tid * 17
    wp = tl.load(t).to(tl.pointer_type(W))
    gp = tl.load(t + 1).to(tl.pointer_type(G))
    vp = tl.load(t + 2).to(tl.pointer_type(tl.float32))
    L, L1, S0, S1, flags = tl.load(t + 3), tl.load(t + 4), tl.load(t + 5), tl.load(t + 6), tl.load(t + 7)
    lrs, bc, beta, omb, eps, ci, lim = coefs(t, tid, steps, flags, CAPT)
    k = tl.arange(0, K)[None, :]
    off = base[:, None] + (k // L1[:, None]) * S1[:, None] + (k % L1[:, None]) * S0[:, None]
    m = rm[:, None] & (k < L[:, None])
    g = tl.load(gp[:, None] + off, mask=m, other=0.0).to(tl.float32)
    w = tl.load(wp[:, None] + off, mask=m, other=0.0).to(tl.float32)
    sq = tl.sum(g * g, 1)
    bad = ((flags & 4) != 0) & ~finite(sq) & rm
    sq = tl.where(bad, 0.0, sq)
    g = tl.where(bad[:, None], 0.0, g)
    v = tl.load(vp + voff, mask=rm, other=0.0)
    v = beta * v + omb * sample(sq, v, lim)
    tl.store(vp + voff, v, mask=rm)
    c = lrs / tl.maximum(tl.maximum(tl.sqrt(v * bc), eps), tl.sqrt(sq) * ci)  # a step turns at most clip * lr
    w = w - c[:, None] * g  # masked lanes stay 0
    mean = tl.sum(w, 1) / L.to(tl.float32)
    w = tl.where(((flags & 1) != 0)[:, None] & m, w - mean[:, None], w)
    norm = tl.maximum(tl.sqrt(tl.sum(w * w, 1)), 1e-12)
    w = tl.where(((flags & 2) != 0)[:, None], w / norm[:, None], w)
    tl.store(wp[:, None] + off, w.to(W), mask=m)
    tl.atomic_add(cnt, tl.sum(bad.to(tl.int64), 0))

@triton.jit
def stepped(wp, gp, s, L, L1, S0, S1, bad, c, K: tl.constexpr):
    """Block ``s`` of one neuron's fan-in after the step, ``w - c g`` (``w`` where the gradient is
    not finite), recomputed by each pass of :func:`loop`; with its offsets and mask."""
    k = s + tl.arange(0, K)
    m = k < L
    off = (k // L1) * S1 + (k % L1) * S0
    g = tl.load(gp + off, mask=m, other=0.0).to(tl.float32)
    w = tl.load(wp + off, mask=m, other=0.0).to(tl.float32)
    return tl.where(bad, w, w - c * g), off, m

@triton.jit
def loop(rows, table, steps, cnt, n, W: tl.constexpr, G: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
         CAPT: tl.constexpr):
    """One neuron of fan-in > 4096 per program, in blocks of K: four passes, ``w - c g``
    recomputed in each, written once."""
    i = tl.program_id(0)
    tid = tl.load(rows + i * 3)
    base = tl.load(rows + i * 3 + 1)
    voff = tl.load(rows + i * 3 + 2)
    t = table + tid * 17
    wp = tl.load(t).to(tl.pointer_type(W)) + base
    gp = tl.load(t + 1).to(tl.pointer_type(G)) + base
    vp = tl.load(t + 2).to(tl.pointer_type(tl.float32))
    L, L1, S0, S1, flags = tl.load(t + 3), tl.load(t + 4), tl.load(t + 5), tl.load(t + 6), tl.load(t + 7)
    lrs, bc, beta, omb, eps, ci, lim = coefs(t, tid, steps, flags, CAPT)
    acc = tl.zeros((K,), dtype=tl.float32)
    for s in range(0, L, K):
        k = s + tl.arange(0, K)
        off = (k // L1) * S1 + (k % L1) * S0
        g = tl.load(gp + off, mask=k < L, other=0.0).to(tl.float32)
        acc += g * g
    sq = tl.sum(acc, 0)
    bad = ((flags & 4) != 0) & ~finite(sq)
    sq = tl.where(bad, 0.0, sq)
    v = tl.load(vp + voff)
    v = beta * v + omb * sample(sq, v, lim)
    tl.store(vp + voff, v)
    c = tl.where(bad, 0.0, lrs / tl.maximum(tl.maximum(tl.sqrt(v * bc), eps), tl.sqrt(sq) * ci))  # c = 0: a NaN g is never read into w
    acc = tl.zeros((K,), dtype=tl.float32)
    for s in range(0, L, K):
        x, off, m = stepped(wp, gp, s, L, L1, S0, S1, bad, c, K)
        acc += x
    mean = tl.where((flags & 1) != 0, tl.sum(acc, 0) / L.to(tl.float32), 0.0)
    acc = tl.zeros((K,), dtype=tl.float32)
    for s in range(0, L, K):
        x, off, m = stepped(wp, gp, s, L, L1, S0, S1, bad, c, K)
        x = tl.where(m, x - mean, 0.0)
        acc += x * x
    norm = tl.where((flags & 2) != 0, tl.maximum(tl.sqrt(tl.sum(acc, 0)), 1e-12), 1.0)
    for s in range(0, L, K):
        x, off, m = stepped(wp, gp, s, L, L1, S0, S1, bad, c, K)
        tl.store(wp + off, ((x - mean) / norm).to(W), mask=m)
    tl.atomic_add(cnt, bad.to(tl.int64))

@triton.jit
def elements(rows, table, steps, cnt, n, W: tl.constexpr, G: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
             CAPT: tl.constexpr):
    """K consecutive elements of one unconstrained tensor per program (v per element)."""
    i = tl.program_id(0)
    tid = tl.load(rows + i * 2)
    start = tl.load(rows + i * 2 + 1)
    t = table + tid * 17
    wp = tl.load(t).to(tl.pointer_type(W))
    gp = tl.load(t + 1).to(tl.pointer_type(G))
    vp = tl.load(t + 2).to(tl.pointer_type(tl.float32))
    L, flags = tl.load(t + 3), tl.load(t + 7)
    lrs, bc, beta, omb, eps, ci, lim = coefs(t, tid, steps, flags, CAPT)
    e = start + tl.arange(0, K)
    m = e < L
    g = tl.load(gp + e, mask=m, other=0.0).to(tl.float32)
    bad = ((flags & 4) != 0) & ~finite(g) & m
    g = tl.where(bad, 0.0, g)
    v = tl.load(vp + e, mask=m, other=0.0)
    v = beta * v + omb * sample(g * g, v, lim)
    tl.store(vp + e, v, mask=m)
    w = tl.load(wp + e, mask=m, other=0.0).to(tl.float32)
    w = w - lrs * g / tl.maximum(tl.maximum(tl.sqrt(v * bc), eps), tl.abs(g) * ci)
    tl.store(wp + e, w.to(W), mask=m)
    tl.atomic_add(cnt, tl.sum(bad.to(tl.int64), 0))
