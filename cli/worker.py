"""A long-lived zoo worker: ``python -m nerofy_cli.worker``.

Reads one JSON task per line on stdin, answers JSON lines on its original stdout:
``{"event": "ready"}`` once, then per task any number of ``{"event": "stage", ...}`` (so the parent
knows where a model that hangs or dies was) and one ``{"event": "row", "row": {...}}``. Anything
the models print goes to stderr, never into the protocol. The parent kills and replaces a worker
only when a model times out, blows the memory guard or crashes the interpreter.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import traceback
import warnings


def _die_with_parent() -> None:
    try:  # Linux: SIGKILL this worker when the parent dies (no orphans after a kill -9)
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _limit_memory(max_mb: float) -> None:
    """A hard backstop under the parent's RSS guard: allocations far beyond it fail in-process
    (MemoryError / "can't allocate memory", reported as ``oom``) instead of swapping the machine."""
    if max_mb <= 0:
        return
    try:
        import resource

        limit = int(max_mb * 1.5 + 4096) * 1024 * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    except Exception:
        pass


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # prints from model code land on stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    _die_with_parent()
    _limit_memory(float(os.environ.get("NEROFY_WORKER_MAX_MB", "0") or 0))
    warnings.filterwarnings("ignore")
    logging.getLogger("nerofy").setLevel(logging.ERROR)
    logging.getLogger("timm").setLevel(logging.ERROR)

    import torch

    threads = int(os.environ.get("NEROFY_WORKER_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    from . import jobs

    # everything a job needs is imported before "ready": a model's timeout never pays for imports
    import nerofy.check  # noqa: F401
    import nerofy.rewrite  # noqa: F401

    try:
        import timm  # noqa: F401
    except ImportError:
        pass
    for mod in filter(None, os.environ.get("NEROFY_WORKER_PREIMPORT", "").split(",")):
        try:  # another model source's heavy imports (transformers: ~20 s) stay out of every timeout
            __import__(mod)
        except ImportError:
            pass

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    # what is alive now (modules, caches) lives as long as the worker: out of every later collection
    # (a full collection walks ~0.5M such objects, ~0.2 s per model, a third of a structural sweep's
    # wall time); refcounting still frees them
    gc.collect()
    gc.freeze()
    send({"event": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        task = json.loads(line)
        name = task["name"]

        def stage(s: str, **info) -> None:
            send({"event": "stage", "stage": s, **info})

        try:
            src = task.get("source", "timm")
            if src != "timm":
                from . import sources

                if task.get("mode") == "structural":
                    row = sources.structural_job(src, name, stage)
                else:
                    row = sources.check_job(src, name, stage, steps=task.get("steps", 3),
                                            verify=task.get("verify", True), max_params=task.get("max_params"),
                                            batch=task.get("batch", 2))
            elif task.get("mode") == "structural":
                row = jobs.structural_job(name, stage, kwargs=task.get("kwargs"))
            else:
                row = jobs.check_job(name, stage, steps=task.get("steps", 3), verify=task.get("verify", True),
                                     max_params=task.get("max_params"), kwargs=task.get("kwargs"),
                                     batch=task.get("batch", 2),
                                     grad_checkpointing=task.get("grad_checkpointing", False))
        except BaseException as e:  # a bug in the job itself: still one row
            row = jobs.base_row(name, task.get("mode", "check"))
            row["status"] = "oom" if jobs.is_oom(e) else "fail_create"
            row["error"] = f"worker error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
            traceback.print_exc()
        jobs.release_memory()  # the model's cycles go here
        gc.freeze()  # what survived (modules this model imported) joins the permanent set
        send({"event": "row", "row": row, "rss_mb": round(jobs.rss_mb(), 1)})


if __name__ == "__main__":
    main()
