"""Plan + wrap time for timm resnet50 and vit_base_patch16_224 (CPU), split into plan and rewrite.

Each round builds a fresh model (not timed), then times:

* ``plan``:    ``nerofy.plan(model)`` (fx trace on the meta device with the model's declared input
               size, analysis, role resolution);
* ``rewrite``: ``nerofy.wrap(model, plan=plan)`` (balanced parametrizations registered in place,
               every constrained weight projected, the matching Nero built);
* ``wrap``:    ``nerofy.wrap(model)`` end to end on another fresh model (plan + rewrite).

The first plan in a process also pays for a one-time lazy import inside torch (the meta kernels
pull in torch._dynamo); it is timed separately as ``first call`` and excluded from the medians.

    python benchmarks/wrap_time.py                 # resnet50 and vit_base_patch16_224, 1 thread and all
    python benchmarks/wrap_time.py --rounds 3 --threads 1
    python benchmarks/wrap_time.py --models resnet18 --quick

Writes benchmarks/results/wrap_time.md and .json (``--out`` to change the folder).
Target: wrap(resnet50) <= 1 s on the 2-core development machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import nerofy  # noqa: E402

MODELS = ("resnet50", "vit_base_patch16_224")
TARGET = ("resnet50", 1.0)  # wrap(resnet50) <= 1 s


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _create(name: str):
    import timm

    return timm.create_model(name, pretrained=False)


def _first_call_s() -> float:
    """The one-time cost of the first meta forward in this process (lazy imports inside torch)."""
    t = time.perf_counter()
    nerofy.plan(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    return time.perf_counter() - t


def bench(name: str, rounds: int) -> dict:
    plan_s, rewrite_s, wrap_s = [], [], []
    info = {}
    for _ in range(rounds):
        model = _create(name)
        t = time.perf_counter()
        plan = nerofy.plan(model)
        t1 = time.perf_counter()
        nerofy.wrap(model, plan=plan)
        t2 = time.perf_counter()
        plan_s.append(t1 - t)
        rewrite_s.append(t2 - t1)
        s = plan.summary()
        info = dict(tensors=len(plan), params_m=round(s["total_params"] / 1e6, 2), frontend=plan.frontend,
                    constrained_share=round(s["constrained_share"], 4),
                    neurons=s["tensors"]["neuron"], warnings=len(plan.warnings))
        del model, plan
        model = _create(name)
        t = time.perf_counter()
        nerofy.wrap(model)
        wrap_s.append(time.perf_counter() - t)
        del model

    def stats(xs):
        return dict(median=statistics.median(xs), min=min(xs), max=max(xs), all=[round(x, 4) for x in xs])

    return dict(model=name, **info, plan=stats(plan_s), rewrite=stats(rewrite_s), wrap=stats(wrap_s))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="intra-op thread counts to run (default: 1 and all cores)")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1 thread")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.threads = 2, [1]
    threads = args.threads or sorted({1, os.cpu_count() or 1})

    first = _first_call_s()
    import timm  # noqa: F401  (imported before timing)

    res = dict(
        benchmark="wrap_time", date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=dict(cpu=_cpu_name(), cpus=os.cpu_count(), python=platform.python_version(),
                     torch=torch.__version__, timm=sys.modules["timm"].__version__),
        rounds=args.rounds, first_call_s=round(first, 3), load_average_before=_loadavg(), runs=[],
    )
    md = ["# Plan + wrap time (CPU)", "",
          f"{res['machine']['cpu']} ({res['machine']['cpus']} CPUs); torch {torch.__version__}; "
          f"timm {res['machine']['timm']}; {args.rounds} rounds per model, each on a fresh model (creation not "
          f"timed); medians (min-max). `plan` = nerofy.plan(model) with the model's declared input size (fx on "
          f"meta); `rewrite` = nerofy.wrap(model, plan=plan); `wrap` = nerofy.wrap(model) end to end. "
          f"The first plan in a process paid {first:.2f} s once for torch's lazy imports (not in the medians). "
          f"Load average before the run: {res['load_average_before']} (above the CPU count, other processes "
          f"shared the cores).", ""]
    n0 = torch.get_num_threads()
    for th in threads:
        torch.set_num_threads(th)
        rows = []
        for name in args.models:
            r = bench(name, args.rounds)
            r["threads"] = th
            r["load_average_after"] = _loadavg()
            res["runs"].append(r)
            rows.append(r)
            print(f"[{th} thread(s)] {name}: plan {r['plan']['median']:.3f}s rewrite {r['rewrite']['median']:.3f}s "
                  f"wrap {r['wrap']['median']:.3f}s", flush=True)
        md += [f"## {th} thread{'s' if th > 1 else ''}", "",
               "| model | params | tensors | constrained | plan s | rewrite s | wrap s (plan + rewrite) |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            def cell(k):
                return f"{r[k]['median']:.3f} ({r[k]['min']:.3f}-{r[k]['max']:.3f})"
            md.append(f"| {r['model']} | {r['params_m']}M | {r['tensors']} | {r['constrained_share']:.1%} | "
                      f"{cell('plan')} | {cell('rewrite')} | {cell('wrap')} |")
        for r in rows:
            if r["model"] == TARGET[0]:
                ok = r["wrap"]["median"] <= TARGET[1]
                md.append("")
                md.append(f"- {'PASS' if ok else 'FAIL'}: wrap({TARGET[0]}) median {r['wrap']['median']:.3f} s "
                          f"<= {TARGET[1]:g} s (best {r['wrap']['min']:.3f} s)")
        md += ["", f"Load average after this block: {_loadavg()}.", ""]
    torch.set_num_threads(n0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wrap_time.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "wrap_time.md").write_text("\n".join(md))
    print(f"wrote {args.out / 'wrap_time.md'} and .json")
    return res


if __name__ == "__main__":
    main()
