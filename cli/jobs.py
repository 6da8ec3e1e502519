"""One model, one JSON-able row: the jobs that ``nerofy zoo`` runs in its workers (and tests call
directly). Statuses are the closed set of DESIGN §6 (``nerofy.check.STATUSES``).

Two jobs:

* :func:`structural_job`: build the model on the ``meta`` device, plan it (trace + rules) and apply
  the plan (parametrize) there: no memory, no compute, every architecture.
* :func:`check_job`: the full check of :func:`nerofy.check.check_model` on real random weights, two
  samples at the model's own input size; models over ``max_params`` get the structural job instead
  and the status ``skipped_size`` (the structural result is kept in the row).

Peak memory is the worker's peak resident set size during the job: Linux's ``VmHWM`` after
resetting it through ``/proc/self/clear_refs`` at the start of the job (``peak_source:
"VmHWM"``), which works in a long-lived worker; where that reset is unavailable, the process's
``ru_maxrss`` (a lifetime peak, ``peak_source: "ru_maxrss"``). ``base_rss_mb`` is the resident size
when the job started (interpreter + torch + timm), so ``peak_rss_mb - base_rss_mb`` is what the
model added.
"""
from __future__ import annotations

import functools
import gc
import os
import platform
import resource
import sys
import time
from typing import Callable

import torch

from . import models as M

Stage = Callable[..., None]


def _noop(stage: str, **info) -> None:
    pass

MAX_WARNINGS = 5
MAX_ERROR = 400


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    """nerofy's git commit (``+dirty`` when nerofy/ has local changes), or '' outside a checkout."""
    import subprocess

    import nerofy

    root = os.path.dirname(os.path.dirname(os.path.abspath(nerofy.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "nerofy"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except Exception:
        return ""
    return head + ("+dirty" if head and dirty else "")


def versions() -> dict[str, str]:
    import nerofy

    out = {"torch": torch.__version__, "nerofy": nerofy.__version__, "nerofy_git": _git_commit(),
           "python": platform.python_version()}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        out["timm"] = ""
    tf = sys.modules.get("transformers")  # only where the row's source loaded it: its rows depend on the version
    if tf is not None:
        out["transformers"] = getattr(tf, "__version__", "")
    return out


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> str:
    """Reset the peak-RSS counter where the OS allows; returns the measure that peak_mb() reads."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        if _status_kb("VmHWM") is not None:
            return "VmHWM"
    except OSError:
        pass
    return "ru_maxrss"


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:
        return peak_mb("ru_maxrss")
    return kb / 1024


def peak_mb(source: str) -> float:
    if source == "VmHWM":
        kb = _status_kb("VmHWM")
        if kb is not None:
            return kb / 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def release_memory() -> None:
    """Give freed memory back to the OS between models (glibc keeps it otherwise)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def is_oom(e: BaseException | str) -> bool:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return isinstance(e, MemoryError) or any(s in text for s in (
        "MemoryError", "can't allocate memory", "out of memory", "Cannot allocate memory",
        "not enough memory"))


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:MAX_ERROR]


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def base_row(name: str, mode: str) -> dict:
    return {"name": name, "mode": mode, "status": "", "error": "", "family": M.family(name) if ":" not in name else "",
            "tracer": "", "attempts": [], "total_params": 0, "tensors_by_role": {}, "params_by_role": {},
            "constrained_share": 0.0, "warnings": 0, "warning_samples": [], "times": {},
            "peak_rss_mb": 0.0, "base_rss_mb": 0.0, "peak_source": "", "versions": versions()}


def _plan_fields(row: dict, plan) -> None:
    s = plan.summary()
    row["tracer"] = plan.frontend
    row["attempts"] = [[f, m[:200]] for f, m in plan.attempts]
    row["tensors_by_role"] = {k: v for k, v in s["tensors"].items() if v}
    row["params_by_role"] = {k: v for k, v in s["params"].items() if v}
    row["total_params"] = s["total_params"]
    row["constrained_share"] = round(s["constrained_share"], 6)
    row["chain"] = plan.chain  # weighted layers in series (wrap shortens Nero's cap above nerofy.plan.CHAIN_REF)
    row["warnings"] = len(plan.warnings)
    row["warning_samples"] = [w[:300] for w in plan.warnings[:MAX_WARNINGS]]


def structural(model, row: dict, stage: Stage, plan_from: tuple | None = None) -> str:
    """Plan and rewrite ``model`` (on meta) in place; fills ``row``; returns the status.
    ``plan_from``: (a real copy of the model, example inputs) to plan from instead."""
    import nerofy
    from nerofy.rewrite import apply_plan

    stage("plan")
    t = time.perf_counter()
    try:
        plan = nerofy.plan(*plan_from) if plan_from else nerofy.plan(model)
    except Exception as e:
        row["error"] = _err(e)
        return "oom" if is_oom(e) else "fail_plan"
    row["times"]["plan"] = round(time.perf_counter() - t, 4)
    _plan_fields(row, plan)
    stage("rewrite")
    t = time.perf_counter()
    try:
        apply_plan(model, plan)
    except Exception as e:
        row["error"] = _err(e)
        return "oom" if is_oom(e) else "fail_rewrite"
    row["times"]["rewrite"] = round(time.perf_counter() - t, 4)
    return "pass"


def _finish(row: dict, t0: float, source: str) -> dict:
    row["times"]["total"] = round(time.perf_counter() - t0, 4)
    if "_cpu0" in row:  # CPU seconds of this process: a measure that other load on the machine does not inflate
        row["times"]["cpu"] = round(time.process_time() - row.pop("_cpu0"), 4)
    row["peak_rss_mb"] = round(peak_mb(source), 1)
    row["peak_source"] = source
    return row


def start_row(name: str, mode: str, stage: Stage = _noop) -> tuple[dict, str, float]:
    """A fresh row with the CPU clock and the peak-memory mark reset: (row, peak source, t0)."""
    row = base_row(name, mode)
    row["_cpu0"] = time.process_time()
    source = reset_peak()
    row["base_rss_mb"] = round(rss_mb(), 1)
    t0 = time.perf_counter()
    stage("create")
    return row, source, t0


def structural_job(name: str, stage: Stage = _noop, kwargs: dict | None = None) -> dict:
    """Trace + plan + rewrite on the meta device."""
    row, source, t0 = start_row(name, "structural", stage)
    try:
        model = M.create(name, meta=True, kwargs=kwargs)
    except Exception as e:
        row["status"], row["error"] = ("oom" if is_oom(e) else "fail_create"), _err(e)
        return _finish(row, t0, source)
    row["times"]["create"] = round(time.perf_counter() - t0, 4)
    row["total_params"] = M.count_params(model)
    stage("counted", total_params=row["total_params"])
    row["status"] = structural(model, row, stage)
    del model
    return _finish(row, t0, source)


def too_big(row: dict, model, max_params: int | None, stage: Stage = _noop) -> bool:
    """Count the built model's parameters into the row; over ``max_params`` the row becomes
    ``skipped_size`` (True: the caller finishes it without checking)."""
    row["total_params"] = sum(p.numel() for p in model.parameters())
    stage("counted", total_params=row["total_params"])
    if max_params and row["total_params"] > max_params:
        row["status"] = "skipped_size"
        row["error"] = f"{row['total_params'] / 1e6:.1f}M parameters > --max-params {max_params / 1e6:.0f}M"
        return True
    return False


def fill_check_row(row: dict, r, steps: int, batch: int | None = None, verify: bool | str = True) -> None:
    """Copy a nerofy.check.CheckResult into a zoo row (status, roles, axes, loss, times)."""
    d = r.to_dict()
    row["batch"], row["verify"] = batch, verify
    row["status"], row["error"] = r.status, r.error[:MAX_ERROR]
    if r.status != "pass" and is_oom(r.error):
        row["status"] = "oom"
    row["tracer"] = r.frontend
    row["tensors_by_role"] = {k: v for k, v in d["tensors_by_role"].items() if v}
    row["params_by_role"] = {k: v for k, v in d["params_by_role"].items() if v}
    if r.total_params:
        row["total_params"] = r.total_params
    row["constrained_share"] = round(r.constrained_share, 6)
    row["warnings"] = len(r.warnings)
    row["warning_samples"] = [w[:300] for w in r.warnings[:MAX_WARNINGS]]
    row["axes"] = d["axes"]
    row["axis_failures"] = [a[:300] for a in d["axis_failures"][:5]]
    row["max_constraint_error"] = d["max_constraint_error"]
    row["loss"] = [round(x, 6) for x in d["loss"]]
    row["times"].update({k: round(v, 4) for k, v in d["times"].items()})
    row["steps"] = steps


def check_job(name: str, stage: Stage = _noop, *, steps: int = 3, verify: bool | str = True,
              max_params: int | None = 60_000_000, kwargs: dict | None = None, batch: int = 2,
              seed: int = 0, grad_checkpointing: bool = False) -> dict:
    """The full check (see module doc); models over ``max_params`` get ``skipped_size``."""
    from nerofy.check import check_model

    row, source, t0 = start_row(name, "check", stage)
    try:
        meta = M.create(name, meta=True, kwargs=kwargs)
        n = M.count_params(meta)
    except Exception as e:
        meta, n = None, None  # some factories cannot build on meta: count on the real model
    if n is not None:
        row["total_params"] = n
        stage("counted", total_params=n)
    over = max_params and n is not None and n > max_params
    no_fit = cannot_fit(n, row["base_rss_mb"]) if n is not None else None
    if meta is not None and (over or no_fit):
        row["times"]["create"] = round(time.perf_counter() - t0, 4)
        st = structural(meta, row, stage)
        row["structural"] = st
        row["status"] = ("skipped_size" if over else "oom") if st == "pass" else st
        if st == "pass":
            row["error"] = (f"{n / 1e6:.1f}M parameters > --max-params {max_params / 1e6:.0f}M: structural check only"
                            if over else no_fit + "; structural check: pass")
        return _finish(row, t0, source)
    del meta
    stage("create")
    try:
        torch.manual_seed(seed)
        model = M.create(name, kwargs=kwargs)
        row["total_params"] = M.count_params(model)
        inputs = M.make_inputs(model, None, batch=batch, seed=seed)
        row["input_size"] = list(inputs[0].shape[1:])
    except Exception as e:
        row["status"], row["error"] = ("oom" if is_oom(e) else "fail_create"), _err(e)
        return _finish(row, t0, source)
    row["times"]["create"] = round(time.perf_counter() - t0, 4)
    if grad_checkpointing:
        row["grad_checkpointing"] = _enable_grad_checkpointing(model)
    if max_params and row["total_params"] > max_params:  # could not count on meta
        row["status"] = "skipped_size"
        row["error"] = f"{row['total_params'] / 1e6:.1f}M parameters > --max-params (not buildable on meta)"
        return _finish(row, t0, source)
    import nerofy

    stage("plan")
    t = time.perf_counter()
    try:
        plan = nerofy.plan(model)
    except Exception as e:
        row["status"], row["error"] = ("oom" if is_oom(e) else "fail_plan"), _err(e)
        return _finish(row, t0, source)
    row["times"]["plan"] = round(time.perf_counter() - t, 4)
    _plan_fields(row, plan)
    stage("check")
    r = check_model(model, inputs, steps=steps, verify=verify, plan=plan)
    del model, inputs
    if needs_batch_2(batch, r.error):
        release_memory()
        return batch_2_row(check_job(name, stage, steps=steps, verify=verify, max_params=max_params, kwargs=kwargs,
                                     batch=2, seed=seed, grad_checkpointing=grad_checkpointing))
    fill_check_row(row, r, steps, batch, verify)
    del r
    return _finish(row, t0, source)


def _enable_grad_checkpointing(model) -> bool | str:
    """timm's set_grad_checkpointing: True, or why it could not be turned on (the check runs without)."""
    fn = getattr(model, "set_grad_checkpointing", None)
    if fn is None:
        return "not supported: the model has no set_grad_checkpointing"
    try:
        fn(True)
    except Exception as e:
        return f"not supported: {_err(e)}"
    return True


# The least resident memory per parameter a full check of a wrapped model has needed: fp32 stored
# weights, the balanced weights forward computes and backward keeps, gradients, and the allocator's
# share. Measured over the 45 timm models above 600M parameters (batch 1): 13.7 B/param at the
# least (vit_giantopt_patch16_siglip_gap_256, 224 px), up to 33 at 1024 px. A model whose floor is
# over the memory guard cannot pass; building and running it would only spend minutes of its timeout.
FLOOR_BYTES = 13


def cannot_fit(n_params: int, base_mb: float) -> str | None:
    """Why a model of ``n_params`` cannot pass under this worker's memory guard, or None."""
    guard = float(os.environ.get("NEROFY_WORKER_MAX_MB", "0") or 0)
    floor = n_params * FLOOR_BYTES / 2**20 + base_mb
    if not guard or floor <= guard:
        return None
    return (f"not run: needs at least {floor / 1024:.1f} GB ({n_params / 1e9:.2f}B parameters x {FLOOR_BYTES} bytes, "
            f"the least any model over 600M parameters needed in the zoo's full check, + the worker's "
            f"{base_mb / 1024:.1f} GB) > the {guard / 1024:.1f} GB memory guard")


def needs_batch_2(batch: int, error: str) -> bool:
    """BatchNorm in training mode cannot normalise one value per channel (a BN after global pooling,
    or on a flattened head): at batch 1 that is the harness's limit, not the model's or nerofy's."""
    from nerofy.plan import BN_SINGLE_VALUE

    return batch == 1 and BN_SINGLE_VALUE in (error or "")


def batch_2_row(row: dict) -> dict:
    row["note"] = "batch 1 cannot train BatchNorm on one value per channel: checked at batch 2"
    return row
