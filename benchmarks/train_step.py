"""Training-step time and peak memory on CPU: timm resnet50 and vit_small, wrapped by nerofy + Nero
against the original model + AdamW, side by side in one run.

A step is forward + backward + optimizer step (cross-entropy on a fixed random batch).

Configurations:
  original + AdamW          torch.optim.AdamW at its defaults (foreach), the plain timm model
  nerofy.wrap + Nero        nerofy.wrap(model): balanced parametrizations + nerofy's Nero (defaults)
  plain + nerofy Nero       (diagnostic) the plain model, no parametrization, nerofy's Nero with the
                            plan's layouts: the paper's own algorithm (step, then re-project). The gap
                            to the line above is what the parametrization costs in forward/backward.

Time: all configurations live in one process and take turns step by step (the order rotates every
round) so that load from other processes on a shared machine hits them alike; the ratio reported is
the median of per-round ratios. Forward+backward and optimizer-step times are also reported apart.

Peak memory: each configuration runs in a fresh subprocess (configurations alternate, ``--mem-reps``
times each). After the model and batch are made, the subprocess resets the kernel's RSS high-water
mark (``echo 5 > /proc/self/clear_refs``), notes its RSS, wraps / builds the optimizer and trains
``--mem-steps`` steps, then reads the high-water mark (``VmHWM`` in /proc/self/status; it sees
torch's CPU allocations, unlike tracemalloc). Training peak = VmHWM - that RSS: the same starting
point for every configuration (without the reset, ru_maxrss is dominated by the transient peak of
importing timm and creating the model, and every configuration reads the same). So "training peak" = activations + gradients + optimizer state + parametrization
buffers + allocator slack during the first steps.

    python benchmarks/train_step.py                    # resnet50 + vit_small, batch 4 at 128px, 1 thread
    python benchmarks/train_step.py --quick            # smoke run (tiny models)
    python benchmarks/train_step.py --size 224 --batch 16 --rounds 10

Writes benchmarks/results/train_step.json and docs/train_step.png (``--out``, ``--plots``).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import nerofy  # noqa: E402

logging.getLogger("nerofy").setLevel(logging.ERROR)

CONFIGS = ["original + AdamW", "nerofy.wrap + Nero", "plain + nerofy Nero"]
BASE, OURS = CONFIGS[0], CONFIGS[1]
MODELS = {"resnet50": "resnet50", "vit_small": "vit_small_patch16_224"}
QUICK_MODELS = {"resnet18": "resnet18"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM (since the last reset_peak) or, where that is unavailable, ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def create(arch: str, size: int):
    import timm
    kw = {"img_size": size} if "vit" in arch else {}
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=1000, **kw)


def build(config: str, model, x):
    """Return (model, optimizer) for a configuration (the model is changed in place for nerofy)."""
    if config == BASE:
        return model, torch.optim.AdamW(model.parameters())
    if config == OURS:
        return nerofy.wrap(model, example_inputs=(x[:2],))
    if config == "plain + nerofy Nero":
        plan = nerofy.plan(model, (x[:2],))
        params = dict(model.named_parameters())
        groups: dict = {}
        for e in plan:
            lay = e.layout()
            if lay is not None:
                groups.setdefault(lay, []).append(params[e.name])
        opt = nerofy.Nero([{"params": ps, "layout": lay} for lay, ps in groups.items()])
        opt.project_()
        return model, opt
    raise ValueError(config)


def state_bytes(opt) -> int:
    n = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                n += v.numel() * v.element_size()
    return n


def step(model, opt, x, y):
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def child(a) -> None:
    """One configuration in a fresh process: print its memory as JSON."""
    torch.set_num_threads(a.threads)
    model = create(a.arch, a.size)
    torch.manual_seed(1)
    x, y = torch.randn(a.batch, 3, a.size, a.size), torch.randint(0, 1000, (a.batch,))
    reset = reset_peak()
    base = rss_bytes()
    model, opt = build(a.child, model, x)
    after_build = rss_bytes()
    for _ in range(a.mem_steps):
        step(model, opt, x, y)
    print(json.dumps({"config": a.child, "hwm_reset": reset, "base_rss": base, "after_build_rss": after_build,
                      "peak_rss": peak_rss_bytes(), "end_rss": rss_bytes(), "state_bytes": state_bytes(opt),
                      "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))


def time_side_by_side(arch, a, log):
    torch.set_num_threads(a.threads)
    base_model = create(arch, a.size)
    torch.manual_seed(1)
    x, y = torch.randn(a.batch, 3, a.size, a.size), torch.randint(0, 1000, (a.batch,))
    runs = {}
    for c in CONFIGS:
        t0 = time.perf_counter()
        m, o = build(c, copy.deepcopy(base_model), x)
        runs[c] = {"model": m, "opt": o, "build_s": time.perf_counter() - t0, "fb": [], "opt_s": []}
    del base_model
    for r in range(a.warmup + a.rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for c in order:
            fb, st = step(runs[c]["model"], runs[c]["opt"], x, y)
            if r >= a.warmup:
                runs[c]["fb"].append(fb)
                runs[c]["opt_s"].append(st)
        if r >= a.warmup:
            log(f"  {arch} round {r - a.warmup + 1}/{a.rounds}: " + ", ".join(
                f"{c} {runs[c]['fb'][-1] + runs[c]['opt_s'][-1]:.3f}s" for c in CONFIGS))
    out = {}
    for c in CONFIGS:
        tot = [f + s for f, s in zip(runs[c]["fb"], runs[c]["opt_s"])]
        out[c] = {"step_s_median": statistics.median(tot), "fwd_bwd_s_median": statistics.median(runs[c]["fb"]),
                  "opt_step_s_median": statistics.median(runs[c]["opt_s"]), "build_s": runs[c]["build_s"],
                  "step_s": tot, "fwd_bwd_s": runs[c]["fb"], "opt_step_s": runs[c]["opt_s"],
                  "state_bytes": state_bytes(runs[c]["opt"])}
    bt = [f + s for f, s in zip(runs[BASE]["fb"], runs[BASE]["opt_s"])]
    for c in CONFIGS:
        ct = [f + s for f, s in zip(runs[c]["fb"], runs[c]["opt_s"])]
        out[c]["ratio_vs_base_median"] = statistics.median(t / b for t, b in zip(ct, bt))
        out[c]["fwd_bwd_ratio_vs_base_median"] = statistics.median(
            t / b for t, b in zip(runs[c]["fb"], runs[BASE]["fb"]))
    return out


def memory(arch, a, log):
    res = {c: [] for c in CONFIGS}
    for rep in range(a.mem_reps):
        order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
        for c in order:
            cmd = [sys.executable, __file__, "--child", c, "--arch", arch, "--size", str(a.size), "--batch",
                   str(a.batch), "--threads", str(a.threads), "--mem-steps", str(a.mem_steps)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:  # the child's own error, not just its exit status
                raise SystemExit(f"memory child {c!r} for {arch} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            d = json.loads(p.stdout.strip().splitlines()[-1])
            d["train_peak"] = d["peak_rss"] - d["base_rss"]
            res[c].append(d)
            log(f"  {arch} memory rep {rep + 1} {c}: peak RSS {d['peak_rss'] / 2**20:.0f} MiB, "
                f"training peak (over pre-build RSS) {d['train_peak'] / 2**20:.0f} MiB")
    out = {}
    for c, ds in res.items():
        out[c] = {"train_peak_median": statistics.median(d["train_peak"] for d in ds),
                  "peak_rss_median": statistics.median(d["peak_rss"] for d in ds),
                  "state_bytes": ds[0]["state_bytes"], "param_bytes": ds[0]["param_bytes"], "samples": ds}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mem-reps", type=int, default=1)
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=None, help="keys of " + ", ".join(MODELS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--plots", type=Path, default=HERE.parent / "docs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--arch", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    models = dict(MODELS)
    if a.quick:
        models, a.size, a.batch, a.rounds, a.warmup, a.mem_reps, a.mem_steps = QUICK_MODELS, 32, 2, 1, 1, 1, 1
    if a.models:
        models = {k: v for k, v in {**MODELS, **QUICK_MODELS}.items() if k in a.models}
    T0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)

    res = {"meta": {"torch": torch.__version__, "nerofy": nerofy.__version__, "python": platform.python_version(),
                    "machine": platform.machine(), "cpus": os.cpu_count(), "threads": a.threads, "size": a.size,
                    "batch": a.batch, "rounds": a.rounds, "warmup": a.warmup, "mem_reps": a.mem_reps,
                    "mem_steps": a.mem_steps, "quick": a.quick,
                    "memory_method": "fresh subprocess per configuration (alternating): reset VmHWM via "
                                     "/proc/self/clear_refs after model creation, training peak = VmHWM after "
                                     "the steps minus RSS before wrap/optimizer construction"},
           "models": {}}
    a.out.mkdir(parents=True, exist_ok=True)
    a.plots.mkdir(parents=True, exist_ok=True)
    for key, arch in models.items():
        log(f"{key} ({arch}), batch {a.batch} at {a.size}px, {a.threads} threads: timing side by side")
        t = time_side_by_side(arch, a, log)
        log(f"{key}: memory, one fresh process per configuration")
        m = memory(arch, a, log)
        res["models"][key] = {"arch": arch, "time": t, "memory": m}
        (a.out / "train_step.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    plot(res, a.plots)
    log(f"wrote {a.out / 'train_step.json'} and {a.plots / 'train_step.png'}")


def table(res) -> str:
    lines = ["| model | configuration | step (median) | fwd+bwd | opt step | time vs AdamW | training peak RSS | "
             "peak vs AdamW | optimizer state |", "|---|---|---|---|---|---|---|---|---|"]
    for key, d in res["models"].items():
        bm = d["memory"][BASE]["train_peak_median"]
        for c in CONFIGS:
            t, m = d["time"][c], d["memory"][c]
            lines.append(f"| {key} | {c} | {t['step_s_median']:.3f} s | {t['fwd_bwd_s_median']:.3f} s | "
                         f"{t['opt_step_s_median'] * 1e3:.0f} ms | {t['ratio_vs_base_median']:.2f}x | "
                         f"{m['train_peak_median'] / 2**20:.0f} MiB | {m['train_peak_median'] / bm:.2f}x | "
                         f"{t['state_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def plot(res, folder: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(res["models"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    w = 0.27
    for i, c in enumerate(CONFIGS):
        xs = np.arange(len(keys)) + (i - 1) * w
        fb = [res["models"][k]["time"][c]["fwd_bwd_s_median"] for k in keys]
        st = [res["models"][k]["time"][c]["opt_step_s_median"] for k in keys]
        axes[0].bar(xs, fb, w, label=f"{c}: fwd+bwd", color=f"C{i}")
        axes[0].bar(xs, st, w, bottom=fb, color=f"C{i}", alpha=0.45, hatch="//", label=f"{c}: opt step")
        mem = [res["models"][k]["memory"][c]["train_peak_median"] / 2**20 for k in keys]
        axes[1].bar(xs, mem, w, label=c, color=f"C{i}")
    m = res["meta"]
    for ax, t in zip(axes, ["median step time (s)", "training peak RSS over pre-build (MiB)"]):
        ax.set_xticks(np.arange(len(keys)), keys)
        ax.set_ylabel(t)
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"CPU training step, batch {m['batch']} at {m['size']}px, {m['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "train_step.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
