"""Nero's Triton step (nerofy._triton) against the reference path.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (``_triton.ON_CPU``
routes them there): the same kernel source, the same tables, executed by Triton's interpreter. The
CUDA tests at the end run only where a GPU is present.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nerofy
from nerofy import _triton
from nerofy.layout import NeuronLayout

pytestmark = [pytest.mark.skipif(not _triton.available(), reason=f"triton: {_triton.unavailable_reason()}"),
              # the kernels' finiteness test (x - x == 0) computes inf - inf on purpose; numpy warns under the interpreter
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture
def interpreted(monkeypatch):
    """CPU tensors through the interpreted kernels (conftest sets TRITON_INTERPRET=1 where there is
    no GPU; with a GPU the kernels are compiled and the CUDA tests below cover them)."""
    if not _triton.interpreted():
        pytest.skip("triton kernels are compiled in this process (a GPU is present): see the CUDA tests")
    monkeypatch.setattr(_triton, "ON_CPU", True)
    yield


# (shape, layout): every layout kind the rewrite makes, at odd sizes and on both sides of each
# launch bucket's fan-in limit (16, 128, 1024, 4096) and of the rows-per-program count (256)
LAYOUTS = {
    "rows": ((7, 5), NeuronLayout()),
    "rows_fanin_17": ((3, 17), NeuronLayout()),
    "rows_300_neurons": ((300, 3), NeuronLayout()),
    "rows_fanin_129": ((5, 129), NeuronLayout()),
    "conv": ((3, 4, 3, 3), NeuronLayout()),
    "conv_transpose": ((4, 6, 3, 3), NeuronLayout(axes=(1,))),
    "in_out_columns": ((5, 9), NeuronLayout(axes=(1,))),
    "grouped": ((8, 2, 3, 3), NeuronLayout(axes=(1,), split_axis=0, groups=2)),
    "elementwise": ((11,), NeuronLayout(axes=None)),
    "elementwise_2d": ((33, 40), NeuronLayout(axes=None)),
    "loop_fanin_5000": ((3, 5000), NeuronLayout()),
    "uncentred": ((3, 20), NeuronLayout(center=False)),
    "fan_in_1": ((5, 1), NeuronLayout()),
}


def _grads(shape, dtype, steps, *, bad=True, zero=True):
    """Fixed gradients: a NaN neuron on step 1, an inf element on step 2, a zero neuron on step 0."""
    out = []
    for s in range(steps):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(100 + s)).to(dtype)
        if zero and s == 0 and shape[0] > 1:
            g[0].zero_()
        if bad and s == 1 and shape[0] > 2:
            g[1].fill_(float("nan"))
        if bad and s == 2:
            g.view(-1)[-1] = float("inf")
        out.append(g)
    return out


def _run(w0, lay, grads, *, route, lr=0.05, capturable=False, **kw):
    p = torch.nn.Parameter(w0.clone())
    if route == "triton":
        opt = nerofy.Nero([{"params": [p], "layout": lay}], lr=lr, capturable=capturable, **kw)
    else:  # the per-parameter reference implementation
        opt = nerofy.Nero([{"params": [p], "layout": lay}], lr=lr, fused=False, foreach=False, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


# bf16: triton 3.8's interpreter truncates fp32 -> bf16 casts (its cast_impl passes no rounding mode;
# compiled kernels round to nearest), so over 3 steps weights may drift up to 3 bf16 ulps (2^-7 each)
TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=3 * 2 ** -7),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_kernel_matches_reference(interpreted, kind, dtype):
    shape, lay = LAYOUTS[kind]
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    grads = _grads(shape, dtype, 3)
    before = _triton.stats["launches"]
    got, opt = _run(w0, lay, grads, route="triton")
    launched = _triton.stats["launches"] - before
    want, ref = _run(w0, lay, grads, route="reference")
    assert launched == 3, "every step is one launch of the Triton route"
    assert got.dtype == dtype and opt.state[next(iter(opt.state))]["v"].dtype == torch.float32
    assert not torch.equal(got, w0), "the step moved the weights"
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    torch.testing.assert_close(opt.state[next(iter(opt.state))]["v"], ref.state[next(iter(ref.state))]["v"],
                               atol=1e-7, rtol=1e-5, equal_nan=False)
    assert torch.isfinite(got.float()).all()
    assert opt.skipped() == ref.skipped() > 0
    wv, dims = lay.neuron_view(got.float()) if not lay.elementwise else (None, ())
    if dims and math.prod(wv.shape[d] for d in dims) > 1:  # balanced neurons stay unit-norm
        torch.testing.assert_close(torch.linalg.vector_norm(wv, dim=dims), torch.ones_like(wv.sum(dims)),
                                   atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=0)


@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
@pytest.mark.parametrize("clip, clip_v, factor", [(2.0, True, 1.0), (0.5, True, 1.0), (2.0, False, 1.0),
                                                  (2.0, True, 0.3)])
@pytest.mark.parametrize("kind", ["rows", "elementwise", "loop_fanin_5000"])
def test_kernel_clips_the_running_average_like_the_reference(interpreted, kind, clip, clip_v, factor, capturable):
    """Gradient scales that jump by e^N(0, 1.5) each step clip v's sample often (v takes the gradient
    clipped at clip * its rms, clip_v); a tensor's carried cap factor (nerofy.wrap on a long chain)
    shortens both. The kernel (eager, and capturable: its bias corrections from the device step
    count) matches the reference."""
    from nerofy.optim import CARRIED_CLIP

    shape, lay = LAYOUTS[kind]
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(shape, generator=gen) * torch.exp(torch.randn(1, generator=gen) * 1.5) for _ in range(8)]
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out = []
    for route in ("triton", "reference"):
        p = torch.nn.Parameter(w0.clone())
        setattr(p, CARRIED_CLIP, factor)
        kw = dict(capturable=capturable) if route == "triton" else dict(fused=False, foreach=False)
        opt = nerofy.Nero([{"params": [p], "layout": lay}], lr=0.05, clip=clip, clip_v=clip_v, **kw)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append((p.detach(), opt.state[p]["v"]))
    (w, v), (w_ref, v_ref) = out
    torch.testing.assert_close(w, w_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(v, v_ref, atol=1e-7, rtol=1e-5)


def test_many_tensors_and_groups_in_one_launch_per_bucket(interpreted):
    """Tensors of different groups (own lr, beta) and dtypes share launches: one per (dtype, bucket)."""
    specs = [((6, 5), NeuronLayout(), 0.05), ((4, 7), NeuronLayout(), 0.01), ((3, 2, 3, 3), NeuronLayout(), 0.02),
             ((9,), NeuronLayout(axes=None), 0.03), ((5, 9), NeuronLayout(axes=(1,)), 0.05)]
    torch.manual_seed(1)
    w0 = [torch.randn(s) for s, _, _ in specs]
    grads = [_grads(s, torch.float32, 2, bad=False) for s, _, _ in specs]

    def run(**kw):
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        groups = [{"params": [p], "layout": lay, "lr": lr, "beta": 0.99 if i % 2 else 0.999}
                  for i, (p, (_, lay, lr)) in enumerate(zip(ps, specs))]
        opt = nerofy.Nero(groups, **kw)
        for s in range(2):
            for p, g in zip(ps, grads):
                p.grad = g[s].clone()
            opt.step()
        return ps

    before = _triton.stats["launches"]
    got = run()
    # buckets: fan-in <= 16 (6x5, 4x7 rows; 5x9 columns have fan-in 5), <= 128 (the 3x2x3x3 conv), elementwise
    assert _triton.stats["launches"] - before == 2 * 3
    want = run(fused=False, foreach=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), atol=2e-6, rtol=1e-5)


def test_capturable_with_a_tensor_lr(interpreted):
    """capturable: step counts on the device, lr read from a tensor the user updates in place."""
    shape, lay = (6, 10), NeuronLayout()
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    grads = _grads(shape, torch.float32, 4)
    lr = torch.tensor(0.05)
    p = torch.nn.Parameter(w0.clone())
    opt = nerofy.Nero([{"params": [p], "layout": lay}], lr=lr, capturable=True)
    q = torch.nn.Parameter(w0.clone())
    ref = nerofy.Nero([{"params": [q], "layout": lay}], lr=0.05, fused=False, foreach=False)
    for s, g in enumerate(grads):
        if s == 2:
            lr.fill_(0.01)  # in place: the kernel reads the new value, nothing re-uploaded
            ref.param_groups[0]["lr"] = 0.01
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(p.detach(), q.detach(), atol=2e-6, rtol=1e-5)
    st = opt.state[p]["step"]
    assert isinstance(st, torch.Tensor) and st.item() == 4.0
    assert opt.skipped() == ref.skipped() == 2


def test_capturable_bias_correction_over_many_steps(interpreted):
    """The kernel computes 1 - beta^t itself (series for small t, exp beyond): checked to step 300."""
    shape, lay = (4, 8), NeuronLayout()
    p = torch.nn.Parameter(torch.randn(shape))
    q = torch.nn.Parameter(p.detach().clone())
    opt = nerofy.Nero([{"params": [p], "layout": lay}], lr=0.01, beta=0.99, capturable=True)
    ref = nerofy.Nero([{"params": [q], "layout": lay}], lr=0.01, beta=0.99, fused=False, foreach=False)
    opt.step()  # no grads: nothing happens
    gen = torch.Generator().manual_seed(5)
    for s in range(300):
        g = torch.randn(shape, generator=gen) * (1 + s % 7)
        p.grad, q.grad = g.clone(), g
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(opt.state[p]["v"], ref.state[q]["v"], atol=0, rtol=1e-4)


@pytest.mark.parametrize("resume_capturable", [True, False], ids=["into_capturable", "into_eager"])
def test_capturable_state_dict_round_trip(interpreted, resume_capturable):
    """A capturable optimizer's checkpoint (device step counts) resumes in either mode, exactly as
    if training had gone on."""
    shape, lay = (5, 6), NeuronLayout()
    grads = _grads(shape, torch.float32, 5, bad=False)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    p = torch.nn.Parameter(w0.clone())
    opt = nerofy.Nero([{"params": [p], "layout": lay}], capturable=True)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    sd, w_mid = copy.deepcopy(opt.state_dict()), p.detach().clone()  # state_dict holds live tensors
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(w_mid)
    opt2 = nerofy.Nero([{"params": [q], "layout": lay}], capturable=resume_capturable)
    opt2.load_state_dict(sd)
    for g in grads[3:]:
        q.grad = g.clone()
        opt2.step()
    torch.testing.assert_close(q.detach(), p.detach(), atol=1e-6, rtol=1e-5)
    assert float(opt2.state[q]["step"]) == 5


def test_skipped_counts_and_resets(interpreted):
    shape, lay = (5, 4), NeuronLayout()
    p = torch.nn.Parameter(torch.randn(shape))
    b = torch.nn.Parameter(torch.randn(7))
    opt = nerofy.Nero([{"params": [p], "layout": lay}, {"params": [b], "layout": NeuronLayout(axes=None)}])
    g = torch.randn(shape)
    g[0, 1] = float("nan")
    g[3, 0] = float("-inf")
    gb = torch.randn(7)
    gb[2] = float("inf")
    p.grad, b.grad = g, gb
    w_before = p.detach().clone()
    opt.step()
    assert opt.skipped() == 3  # two neurons, one element
    assert opt.skipped(reset=True) == 3 and opt.skipped() == 0
    assert torch.isfinite(p).all() and torch.isfinite(b).all()
    # a skipped neuron keeps its direction (re-projected only)
    torch.testing.assert_close(p[0].detach(), _balanced(w_before[0]), atol=1e-6, rtol=0)


def _balanced(r):
    r = r - r.mean()
    return r / r.norm()


def test_skip_nonfinite_false_lets_nan_through(interpreted):
    shape, lay = (3, 4), NeuronLayout()
    p = torch.nn.Parameter(torch.randn(shape))
    opt = nerofy.Nero([{"params": [p], "layout": lay}], skip_nonfinite=False)
    g = torch.randn(shape)
    g[1, 2] = float("nan")
    p.grad = g
    opt.step()
    assert torch.isnan(p[1]).all() and torch.isfinite(p[0]).all() and opt.skipped() == 0


def test_rejected_tensors_take_the_foreach_path(interpreted):
    """A tensor the kernel cannot address (not dense in memory) or a dtype it has no kernel for
    (float64) takes the foreach path in the same step; the rest still go to the kernel."""
    lay = NeuronLayout()
    base = torch.randn(6, 10)
    p = torch.nn.Parameter(base[:, ::2])  # strides (10, 2): not dense
    d = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    q = torch.nn.Parameter(torch.randn(3, 4))
    originals = [t.detach().clone() for t in (p, d, q)]
    grads = [torch.randn_like(t) for t in (p, d, q)]
    for t, g in zip((p, d, q), grads):
        t.grad = g.clone()
    before = _triton.stats["launches"]
    nerofy.Nero([{"params": [p, d, q], "layout": lay}]).step()
    assert _triton.stats["launches"] - before == 1  # q only
    for t, w0, g in zip((p, d, q), originals, grads):
        r = torch.nn.Parameter(w0.clone())
        r.grad = g.clone()
        nerofy.Nero([{"params": [r], "layout": lay}], fused=False, foreach=False).step()
        torch.testing.assert_close(t.detach(), r.detach(), atol=2e-6, rtol=1e-5)


class _OpCounter(TorchDispatchMode):
    """Counts the torch ops a step dispatches (the interpreter's own tensor work inside a launch
    is excluded: on a GPU that is the kernel), and notes any read-back to the host."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _triton._launching:
            name = str(func.overloadpacket)
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(n_tensors: int, *, capturable=False, route="triton") -> dict[str, int]:
    torch.manual_seed(0)
    shapes = [(4 + i % 3, 3 + i % 5) for i in range(n_tensors)] + [(7,)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    kw = dict(fused=False) if route == "foreach" else dict(capturable=capturable)
    opt = nerofy.Nero([{"params": ps[:-1]}, {"params": ps[-1:], "layout": NeuronLayout(axes=None)}], **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step creates the state and the tables
    opt.step()
    with _OpCounter() as c:
        opt.step()
    return c.ops


@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
def test_dispatched_ops_per_step_do_not_grow_with_the_number_of_tensors(interpreted, capturable):
    few, many = _ops_per_step(2, capturable=capturable), _ops_per_step(20, capturable=capturable)
    assert few == many, (few, many)
    assert sum(many.values()) <= 8, many
    assert "aten._local_scalar_dense" not in many  # no value read back to the host: no sync
    # the counter itself can fail: the foreach route issues ops per tensor
    f_few, f_many = _ops_per_step(2, route="foreach"), _ops_per_step(20, route="foreach")
    assert sum(f_many.values()) > sum(f_few.values()) + 18


def test_disable_env_takes_the_foreach_path(interpreted, monkeypatch):
    p = torch.nn.Parameter(torch.randn(4, 5))
    p.grad = torch.randn(4, 5)
    monkeypatch.setenv("NEROFY_DISABLE_TRITON", "1")
    before = _triton.stats["launches"]
    nerofy.Nero([p]).step()
    assert _triton.stats["launches"] == before


def test_launches_do_not_grow_with_the_number_of_tensors(interpreted):
    def launches(n):
        ps = [torch.nn.Parameter(torch.randn(3 + i % 4, 5)) for i in range(n)]
        opt = nerofy.Nero(ps)
        for p in ps:
            p.grad = torch.randn_like(p)
        before = _triton.stats["launches"]
        opt.step()
        return _triton.stats["launches"] - before
    assert launches(2) == launches(40) == 1


def test_device_counter_path_of_nero_update_reads_nothing_back():
    """The foreach path with a device counter (its route off the CPU) masks and counts without a sync."""
    from nerofy.optim import nero_update

    w = torch.randn(4, 6)
    g = torch.randn(4, 6)
    g[2, 1] = float("nan")
    v = torch.zeros(4, 1)
    e, ge, ve = torch.randn(5), torch.randn(5), torch.zeros(5)
    ge[0] = float("inf")
    counter = torch.zeros(1, dtype=torch.int64)
    lay = NeuronLayout()
    with _OpCounter() as c:
        n = nero_update([(w, g, v, lay, 1, 1.0)], [(e, ge, ve, 1, 0.1)], lr=0.01, beta=0.999, eps=1e-8,
                        counter=counter)
    assert n == 0 and counter.item() == 2
    assert "aten._local_scalar_dense" not in c.ops and "aten.is_nonzero" not in c.ops
    assert torch.isfinite(w).all() and torch.isfinite(e).all()


@pytest.mark.parametrize("lr", [0.01, "tensor"])
def test_compiled_capturable_step_fullgraph(lr):
    """capturable=True off the Triton route compiles with fullgraph=True (no graph break: nothing
    read back to the host) and matches the eager step."""
    import torch.nn.functional as F

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        return nerofy.wrap(m, lr=torch.tensor(0.01) if lr == "tensor" else lr, capturable=True, fused=False)
    (a, opt_a), (b, opt_b) = make(), make()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch._dynamo.reset()
    step = torch.compile(opt_b.step, backend="eager", fullgraph=True)
    for i in range(3):
        for m, opt, fn in ((a, opt_a, opt_a.step), (b, opt_b, step if i else opt_b.step)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            fn()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert opt_b.state[next(iter(opt_b.state))]["step"].item() == 3
    torch._dynamo.reset()


# -------------------------------------------------------------------------------------------------
# on a GPU
# -------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_cuda_kernel_matches_reference(kind, dtype):
    shape, lay = LAYOUTS[kind]
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    grads = _grads(shape, dtype, 3)
    before = _triton.stats["launches"]
    got, opt = _run(w0.cuda(), lay, [g.cuda() for g in grads], route="triton")
    assert _triton.stats["launches"] - before == 3
    want, ref = _run(w0, lay, grads, route="reference")
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])
    assert opt.skipped() == ref.skipped()


@cuda
def test_cuda_step_has_no_host_sync_and_captures_in_a_graph():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 33, device="cuda")) for _ in range(10)]
    lr = torch.tensor(0.01, device="cuda")
    opt = nerofy.Nero(ps, lr=lr, capturable=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()  # raises on any synchronising call
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        opt.step()
    w = [p.detach().clone() for p in ps]
    g.replay()
    torch.cuda.synchronize()
    assert any(not torch.equal(a, p) for a, p in zip(w, ps))
    assert opt.state[ps[0]]["step"].item() >= 4


@pytest.mark.parametrize("kind", ["rows", "loop_fanin_5000", "elementwise"])
def test_kernel_clip_matches_reference_on_a_gradient_spike(interpreted, kind):
    """Small gradients, then one 1000x larger: the capped step (clip=1, the default) and the
    paper's (clip=None) are the reference's on every kernel (registers, looped, elementwise), and
    the cap shortens the spike's step."""
    shape, lay = LAYOUTS[kind]
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    grads = _grads(shape, torch.float32, 6, bad=False, zero=False)
    grads[-1] = grads[-1] * 1000.0
    change = {}
    for clip in (1.0, None):
        got, _ = _run(w0, lay, grads, route="triton", clip=clip)
        want, _ = _run(w0, lay, grads, route="reference", clip=clip)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        before, _ = _run(w0, lay, grads[:-1], route="reference", clip=clip)
        change[clip] = (got - before).norm().item()
    assert change[None] > 1.5 * change[1.0]
