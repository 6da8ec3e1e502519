"""The fused CPU kernel (nerofy._fused) against the reference path, and its fallbacks."""
from __future__ import annotations

import logging

import pytest
import torch

from nerofy import _fused
from nerofy.layout import NeuronLayout
from nerofy.optim import Nero, nero_update

needs_kernel = pytest.mark.skipif(not _fused.available(), reason=f"fused kernel unavailable: {_fused.unavailable_reason()}")

ATOL = 2e-6

# (shape, layout, memory format) covering the row-contiguous layouts the kernel takes and some it hands on
CASES = [
    ((16, 8, 3, 3), "auto", None),                       # conv weight, fan-in 72
    ((10, 33), "auto", None),                            # odd fan-in: vector tails
    ((7, 5), "auto", None),                              # fan-in below one vector
    ((4, 4608), "auto", None),                           # the largest resnet50 fan-in
    ((12, 4, 3, 3), "auto", torch.channels_last),        # channels-last: a neuron is still one block
    ((3, 4, 20), NeuronLayout(axes=(0, 1)), None),       # two leading neuron axes
    ((6, 10), NeuronLayout(axes=(1,)), None),            # (in, out) weight: not contiguous -> foreach
    ((4, 3, 2, 2), NeuronLayout(axes=(1,), split_axis=0, groups=2), None),  # grouped transposed conv
    ((8, 9), NeuronLayout(center=False), None),          # normalise only
    ((8, 9), NeuronLayout(normalize=False), None),       # centre only
    ((8, 9), NeuronLayout(center=False, normalize=False), None),  # per-neuron state, no constraint
    ((9,), "auto", None),                                # bias: elementwise
    ((3, 5), "elementwise", None),                       # elementwise matrix
    ((0, 4), "auto", None),                              # empty
]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for shape, _, fmt in CASES:
        t = torch.randn(shape, generator=g) + 0.3  # not centred: the first projection has work to do
        if fmt is not None:
            t = t.contiguous(memory_format=fmt)
        ps.append(torch.nn.Parameter(t))
    return ps


def _groups(ps):
    return [{"params": [p], "layout": lay} for p, (_, lay, _) in zip(ps, CASES)]


def _grads(ps, step, seed=1):
    g = torch.Generator().manual_seed(seed + step)
    out = []
    for p in ps:
        gr = torch.randn(p.shape, generator=g) * 10.0 ** float(torch.randint(-6, 1, (1,), generator=g))
        out.append(gr.contiguous(memory_format=torch.channels_last) if p.dim() == 4 and not p.is_contiguous() else gr)
    return out


def _run(opt_kw, steps=5, late=(), grads_fn=_grads, **kw):
    ps = _params()
    opt = Nero(_groups(ps), lr=0.05, **opt_kw, **kw)
    for t in range(steps):
        for i, (p, g) in enumerate(zip(ps, grads_fn(ps, t))):
            p.grad = None if (i in late and t < 2) else g.clone()
        opt.step()
    return ps, opt


def _assert_same(a, b, atol=ATOL):
    (pa, oa), (pb, ob) = a, b
    for x, y, (shape, lay, _) in zip(pa, pb, CASES):
        torch.testing.assert_close(x.detach(), y.detach(), atol=atol, rtol=0, equal_nan=True, msg=lambda m: f"{shape} {lay}: {m}")
        if oa.state.get(x):
            torch.testing.assert_close(oa.state[x]["v"], ob.state[y]["v"], atol=1e-12, rtol=1e-5, equal_nan=True)
            assert oa.state[x]["step"] == ob.state[y]["step"]


@needs_kernel
def test_fused_equals_reference_over_steps_and_layouts():
    _assert_same(_run(dict(foreach=False)), _run(dict(fused=True)))


@needs_kernel
def test_fused_default_is_used_and_matches_foreach():
    _assert_same(_run(dict(fused=False)), _run(dict()))


@needs_kernel
def test_per_parameter_step_counters():
    # parameters 0 and 11 get no gradient for the first two steps: their bias correction starts later
    ref = _run(dict(foreach=False), late=(0, 11))
    fus = _run(dict(fused=True), late=(0, 11))
    _assert_same(ref, fus)
    assert fus[1].state[fus[0][0]]["step"] == 3 and fus[1].state[fus[0][1]]["step"] == 5


def _bad_grads(ps, step):
    gs = _grads(ps, step)
    if step in (1, 3):
        gs[0][2, 1, 0, 0] = float("nan")   # one neuron of the conv weight
        gs[3][1, 7] = float("inf")         # one neuron of the wide weight
        gs[11][4] = float("-inf")          # one bias element
    return gs


@needs_kernel
@pytest.mark.parametrize("skip", [True, False])
def test_nonfinite_gradients(skip, caplog):
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        ref = _run(dict(foreach=False), grads_fn=_bad_grads, skip_nonfinite=skip)
        n_ref = len([r.message for r in caplog.records if "non-finite" in r.message])
        caplog.clear()
        fus = _run(dict(fused=True), grads_fn=_bad_grads, skip_nonfinite=skip)
        msgs = [r.message for r in caplog.records if "non-finite" in r.message]
    _assert_same(ref, fus)
    if skip:
        def total(ms):
            return sum(int(m.split()[1]) for m in ms)
        assert n_ref == len(msgs) and total(msgs) == 6  # 3 per bad step, one warning per group
        assert all(torch.isfinite(p).all() for p in fus[0])
    else:
        assert not msgs and not torch.isfinite(fus[0][0]).all()


@needs_kernel
def test_skipped_neuron_keeps_its_direction():
    """A neuron whose gradient is non-finite stays put (it is already balanced) and its v decays."""
    w = torch.nn.Parameter(torch.randn(3, 16))
    opt = Nero([w], lr=0.1, fused=True)
    w.grad = torch.randn(3, 16)
    opt.step()
    before, v_before = w.detach().clone(), opt.state[w]["v"].clone()
    g = torch.randn(3, 16)
    g[1, 0] = float("nan")
    w.grad = g
    assert nero_update([(w.detach(), g, opt.state[w]["v"], NeuronLayout(), 2, 1.0)], [], lr=0.1, beta=0.999,
                       eps=1e-16, fused=True) == 1
    torch.testing.assert_close(w[1], before[1], atol=1e-6, rtol=0)
    assert not torch.allclose(w[0], before[0])
    torch.testing.assert_close(opt.state[w]["v"][1], v_before[1] * 0.999)


@needs_kernel
def test_thread_count_does_not_change_results():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _run(dict(fused=True))
        torch.set_num_threads(max(2, old))
        b = _run(dict(fused=True))
    finally:
        torch.set_num_threads(old)
    _assert_same(a, b, atol=0.0)


@needs_kernel
def test_low_precision_parameters():
    def run(**kw):
        p = torch.nn.Parameter(torch.randn(6, 40, generator=torch.Generator().manual_seed(0)).bfloat16())
        opt = Nero([p], lr=0.05, **kw)
        for t in range(4):
            p.grad = torch.randn(6, 40, generator=torch.Generator().manual_seed(t)).bfloat16()
            opt.step()
        return p, opt
    (a, oa), (b, ob) = run(foreach=False), run(fused=True)
    assert b.dtype == torch.bfloat16 and ob.state[b]["v"].dtype == torch.float32
    torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=0)


@needs_kernel
def test_partition_routes_by_layout():
    ps = _params()
    opt = Nero(_groups(ps), fused=False)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step()
    neurons = []
    for p, (shape, lay, _) in zip(ps, CASES):
        L = NeuronLayout() if lay == "auto" else lay
        if isinstance(L, NeuronLayout) and p.dim() > 1 and not L.elementwise:
            neurons.append((p.detach(), p.grad, opt.state[p]["v"], L, 1, 1.0))
    fn, fe, rn, re_, why = _fused.partition(neurons, [])
    fused_shapes = {tuple(x[0].shape) for x in fn}
    assert (12, 4, 3, 3) in fused_shapes and (3, 4, 20) in fused_shapes and (4, 4608) in fused_shapes
    assert {tuple(x[0].shape) for x in rn} == {(6, 10), (4, 3, 2, 2)}
    assert "not contiguous" in why


# ---- fallbacks ---------------------------------------------------------------------------------
@pytest.fixture
def no_kernel(monkeypatch):
    monkeypatch.setattr(_fused, "_state", {"lib": None, "why": "no C compiler found (set CC)", "info": {}})


def test_explicit_fused_without_kernel_warns_once_and_falls_back(no_kernel, caplog):
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        fus = _run(dict(fused=True))
    msgs = [r.message for r in caplog.records if "fused" in r.message]
    assert len(msgs) == 1 and "no C compiler" in msgs[0]
    _assert_same(_run(dict(fused=False)), fus, atol=0.0)


def test_default_fused_without_kernel_is_silent(no_kernel, caplog):
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        _run(dict())
    assert not [r for r in caplog.records if "fused" in r.message]


@needs_kernel
def test_explicit_fused_warns_once_for_layouts_it_cannot_take(caplog):
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        _run(dict(fused=True))
        msgs = [r.message for r in caplog.records if "fused" in r.message]
    assert len(msgs) == 1 and "not contiguous" in msgs[0]


@needs_kernel
def test_default_fused_is_silent_for_layouts_it_cannot_take(caplog):
    with caplog.at_level(logging.WARNING, logger="nerofy"):
        _run(dict())
    assert not [r for r in caplog.records if "fused" in r.message]


def test_fused_true_with_reference_path_is_an_error():
    with pytest.raises(ValueError, match="fused=True and foreach=False"):
        Nero([torch.nn.Parameter(torch.randn(3, 3))], fused=True, foreach=False)


def test_disable_env(monkeypatch):
    monkeypatch.setattr(_fused, "_state", {})
    monkeypatch.setenv("NEROFY_DISABLE_FUSED", "1")
    assert not _fused.available() and "NEROFY_DISABLE_FUSED" in _fused.unavailable_reason()


def test_build_without_compiler(monkeypatch):
    monkeypatch.setattr(_fused, "_compiler", lambda: None)
    lib, why, _ = _fused._build()
    assert lib is None and "no C compiler" in why


def test_state_dict_roundtrip_keeps_fused_option():
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = Nero([p], fused=False)
    p.grad = torch.randn(4, 6)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["fused"] is False
    opt2 = Nero([p])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["fused"] is False
    # a state dict from before the option existed still steps
    del sd["param_groups"][0]["fused"]
    opt3 = Nero([p])
    opt3.load_state_dict(sd)
    p.grad = torch.randn(4, 6)
    opt3.step()


@pytest.mark.slow
def test_benchmark_script_smoke(tmp_path):
    """benchmarks/optimizer_step.py runs end to end and writes its table (slow: builds resnet50)."""
    import importlib.util
    import json
    from pathlib import Path

    pytest.importorskip("timm")
    pytest.importorskip("pytorch_optimizer")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_step.py"
    spec = importlib.util.spec_from_file_location("optimizer_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--quick", "--threads", "1", "--steps", "2", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "optimizer_step.json").read_text())
    rows = {r["name"]: r for r in res["results"]["1"]["rows"]}
    assert rows["nerofy Nero (fused)"]["state_ratio_to_adam"] < 0.002
    assert (tmp_path / "optimizer_step.md").read_text().startswith("# Optimizer step")
