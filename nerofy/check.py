"""The per-model check that tests, ``nerofy convert`` and ``nerofy zoo`` run.

plan -> verify axes on the plain model -> wrap -> forward -> backward -> a few Nero steps ->
constraints hold -> nothing non-finite. The first stage that fails names the status (DESIGN §6).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from .balanced import Balanced
from .layout import upcast
from .plan import Plan, make_plan, positional_inputs
from .rewrite import wrap, wrapped_plan
from .trace import call
from .verify import verify_axes

STATUSES = ("pass", "fail_create", "fail_trace", "fail_plan", "fail_rewrite", "fail_forward", "fail_backward",
            "fail_step", "fail_constraint", "fail_numerics", "timeout", "oom", "skipped_size")


@dataclass
class CheckResult:
    status: str = "pass"
    error: str = ""
    frontend: str = ""
    tensors_by_role: dict = field(default_factory=dict)
    params_by_role: dict = field(default_factory=dict)
    total_params: int = 0
    constrained_share: float = 0.0
    axes: dict = field(default_factory=dict)  # ok / fail / unverified counts
    axis_failures: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    times: dict = field(default_factory=dict)
    max_constraint_error: float = 0.0
    loss: list = field(default_factory=list)
    wrap_output_change: float | None = None  # keep="function": relative output change at wrap

    def to_dict(self) -> dict:
        return asdict(self)


def default_loss(out: Any) -> torch.Tensor:
    """A loss from any output: mean square (|t|^2 for complex) of every floating or complex tensor in it.

    Entries that are +-inf are left out: models mask logits with -inf on purpose (detection heads over
    padded text tokens, causal masks returned as outputs), and the square of a mask says nothing about
    training. NaN is kept, so a model that breaks still fails the finite-loss check; an output that is
    nothing but masks is an error."""
    ts = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
          and t.requires_grad]
    if not ts:
        raise RuntimeError("the model's output holds no floating tensor that requires grad")
    total, used = 0, 0
    for t in ts:
        keep = ~torch.isinf(t)  # the output's own infs (masks), not a square that overflowed
        if bool(keep.all()):
            total, used = total + upcast(t).abs().square().mean(), used + 1
        elif bool(keep.any()):  # indexed before squaring: the mask's entries get a zero gradient, not NaN
            total, used = total + upcast(t[keep]).abs().square().mean(), used + 1
    if not used:
        raise RuntimeError("every floating output of the model is +-inf (masks only): pass a loss of your own")
    return total


def constraint_error(model: nn.Module, plan: Plan) -> float:
    """Largest |mean| or |norm / gain - 1| over the constrained neurons of a wrapped model (each
    balanced neuron's norm is its fixed gain: 1 under the paper's unit norm, the trained norm under
    ``keep="function"``; a neuron of gain 0 must be 0)."""
    worst = 0.0
    mods = dict(model.named_modules())
    for e in plan:
        if not e.constrained:
            continue
        mname, _, attr = e.name.rpartition(".")
        mod = mods[mname]
        w = upcast(getattr(mod, attr).detach())
        gain = 1.0
        if parametrize.is_parametrized(mod, attr):
            for pz in mod.parametrizations[attr]:
                gain = gain * (pz.gain(w) if isinstance(pz, Balanced) else float(getattr(pz, "scale", 1.0)))
        view, dims = e.layout().neuron_view(w)
        norms = torch.linalg.vector_norm(view, dim=dims, keepdim=True)
        gain = torch.as_tensor(gain, dtype=norms.dtype, device=norms.device).expand_as(norms)
        live = gain > 0
        scale = torch.where(live, gain, torch.ones_like(gain))
        if e.center:
            worst = max(worst, float((view.mean(dim=dims, keepdim=True).abs() / scale).max()))
        err = torch.where(live, (norms / scale - 1).abs(), norms)
        worst = max(worst, float(err.max()) if err.numel() else 0.0)
    return worst


@torch.no_grad()
def _outputs(model: nn.Module, inputs) -> list[torch.Tensor]:
    """The floating outputs of one eval-mode forward (dropout off, BatchNorm on its statistics)."""
    was = model.training
    model.eval()
    try:
        return [upcast(t) for t in tree_leaves(call(model, inputs))
                if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    finally:
        model.train(was)


def _change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or not a:
        return float("inf") if len(a) != len(b) else 0.0
    top = max(float(x.abs().max()) if x.numel() else 0.0 for x in a)
    diff = max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))
    return diff / top if top > 0 else diff


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}"


def check_model(model: nn.Module, inputs: tuple, *, steps: int = 3, lr: float = 0.01, verify: bool | str = True,
                plan: Plan | None = None, plan_inputs: Any = None, tol: float = 1e-4, loss_fn=default_loss,
                keep: str = "direction") -> CheckResult:
    """Run the whole check on ``model`` (modified in place: it ends up wrapped).

    ``keep``: as in ``wrap``; with ``"function"`` the result also holds how far the wrapped
    model's outputs moved at wrap (``wrap_output_change``: max abs difference over the largest
    output magnitude), which must be rounding.

    ``verify``: True checks every constrained parameter's axes, ``"sample"`` one per distinct
    (module type, shape, axes) (``axes["sampled_out"]`` counts the rest), False none."""
    if verify not in (True, False, "sample"):
        raise ValueError(f"verify must be True, False or 'sample', got {verify!r}")
    inputs = positional_inputs(model, inputs)  # a dict is keyword inputs
    r = CheckResult()
    if plan is None:
        t = time.perf_counter()
        try:
            plan = make_plan(model, plan_inputs)
        except Exception as e:
            r.status, r.error = "fail_plan", _err(e)
            return r
        r.times["plan"] = time.perf_counter() - t
    s = plan.summary()
    r.frontend, r.tensors_by_role, r.params_by_role = plan.frontend, s["tensors"], s["params"]
    r.total_params, r.constrained_share, r.warnings = s["total_params"], s["constrained_share"], list(plan.warnings)
    if plan.frontend == "modules" and any(msg != "ok" for f, msg in plan.attempts if f != "note"):
        # no frontend traced it: module rules placed what they know; the rest is unconstrained
        unplaced = [e.name for e in plan if e.role == "free" and e.frontend == ""]
        failed = "; ".join(f"{f}: {msg}" for f, msg in plan.attempts if msg != "ok" and f != "note")
        if unplaced:
            r.status = "fail_trace"
            r.error = (f"no frontend traced the model ({failed}); {len(unplaced)} parameters have no rule and "
                       f"stay unconstrained: {', '.join(unplaced[:5])}")
            return r
        r.warnings.insert(0, f"no graph frontend traced the model ({failed}); module rules placed every parameter")

    if verify:
        t = time.perf_counter()
        try:
            res = verify_axes(model, plan, inputs, sample=verify == "sample")
            r.axes = {k: sum(1 for v in res.values() if v.status == k) for k in ("ok", "fail", "unverified")}
            if verify == "sample":
                r.axes["sampled_out"] = sum(1 for e in plan if e.role == "neuron") - len(res)
            r.axis_failures = [f"{v.name}: {v.detail}" for v in res.values() if v.status == "fail"]
        except Exception as e:
            r.axes = {"error": _err(e)}
        r.times["verify"] = time.perf_counter() - t
        if r.axis_failures:
            r.status, r.error = "fail_plan", "axis check failed: " + r.axis_failures[0]
            return r

    before = _outputs(model, inputs) if keep == "function" else None
    t = time.perf_counter()
    try:
        model, opt = wrap(model, lr=lr, plan=plan, keep=keep)
    except Exception as e:
        r.status, r.error = "fail_rewrite", _err(e)
        return r
    r.times["wrap"] = time.perf_counter() - t
    plan = wrapped_plan(model) or plan  # keep="function" records what it relaxed in the model's copy
    r.warnings += [w for w in plan.warnings if w not in r.warnings]
    if before is not None:
        r.wrap_output_change = _change(before, _outputs(model, inputs))
        if not r.wrap_output_change <= tol:
            r.status, r.error = "fail_numerics", (f"keep='function' changed the outputs at wrap by "
                                                  f"{r.wrap_output_change:.2e} (relative) > {tol:g}")
            return r

    model.train()
    for i in range(max(1, steps)):
        t = time.perf_counter()
        try:
            loss = loss_fn(call(model, inputs))
        except Exception as e:
            r.status, r.error = "fail_forward", _err(e)
            return r
        r.times.setdefault("forward", time.perf_counter() - t)
        if not torch.isfinite(loss):
            r.status, r.error = "fail_numerics", f"loss is {float(loss)} at step {i}"
            return r
        r.loss.append(float(loss.detach()))
        t = time.perf_counter()
        try:
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except Exception as e:
            r.status, r.error = "fail_backward", _err(e)
            return r
        r.times.setdefault("backward", time.perf_counter() - t)
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            r.status, r.error = "fail_numerics", f"non-finite gradient in {bad[:3]}"
            return r
        t = time.perf_counter()
        try:
            opt.step()
        except Exception as e:
            r.status, r.error = "fail_step", _err(e)
            return r
        r.times.setdefault("step", time.perf_counter() - t)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        r.status, r.error = "fail_numerics", f"non-finite parameters after {steps} steps: {bad[:3]}"
        return r
    r.max_constraint_error = constraint_error(model, plan)
    if r.max_constraint_error > tol:
        r.status, r.error = "fail_constraint", f"constraint error {r.max_constraint_error:.2e} > {tol:g}"
    return r
