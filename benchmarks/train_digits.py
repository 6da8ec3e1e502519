"""Does Nero train at its default learning rate where Adam and SGD need tuning? scikit-learn's digits.

Data: scikit-learn's bundled digits (1797 8x8 images), one fixed stratified split: 1347 train / 450
test (``random_state=0``); the learning-rate sweep picks on a validation split carved from the train
set (20%, ``random_state=1``), then the chosen rate is run on the full train set and scored on test.

Models (PyTorch default init throughout):
  mlp3      a 3-layer MLP 64-256-256-10, ReLU
  cnn_bn    a small CNN with BatchNorm (the normalised model)
  deepD     plain ReLU MLPs of width 128 and depth D (linear layers) in {5, 10, 20, 50}, no normalisation

Optimizers ("configs"):
  nerofy              nerofy.wrap(model) — lr 0.01, the library's default scale mode, nothing tuned
  nerofy init         nerofy.wrap(model, scale="init")      (scale modes, issue part 2)
  nerofy calibrated   nerofy.wrap(model, scale="unit") + nerofy.calibrate_(model, one train batch of 256)
  nerofy unit         nerofy.wrap(model, scale="unit")      (the paper's unit norm)
  pytorch_optimizer Nero   lr 0.01 on the plain model (constraints=True)
  Adam / AdamW        torch defaults (lr 1e-3; AdamW weight_decay 1e-2) and the swept best lr
  SGD                 momentum 0.9 at lr 0.1 (the common ResNet default) and the swept best lr
  nerofy tuned        nerofy at its swept best lr (to show what tuning would buy)

Batch 64, cross-entropy, no schedule, no augmentation; three seeds; test accuracy mean +- std and
wall time per run (1 thread; the machine is shared, so times are indicative).

    python benchmarks/train_digits.py            # full run (~15 min on 1 free core)
    python benchmarks/train_digits.py --quick    # smoke run, about a minute
    python benchmarks/train_digits.py --models mlp3 deep20 --seeds 0 1

Writes benchmarks/results/train_digits.json (raw: every run, every epoch's test accuracy, the sweep)
and docs/digits_*.png (``--out`` and ``--plots`` to change the folders).
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import nerofy  # noqa: E402

logging.getLogger("nerofy").setLevel(logging.ERROR)

SWEEP = {
    "Adam": [3e-4, 1e-3, 3e-3, 1e-2],
    "AdamW": [3e-4, 1e-3, 3e-3, 1e-2],
    "SGD": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
    "nerofy": [3e-3, 1e-2, 3e-2, 1e-1],
}
LIB_DEFAULT = inspect.signature(nerofy.wrap).parameters["scale"].default  # "nerofy" = this mode
DEFAULT_LR = {"Adam": 1e-3, "AdamW": 1e-3, "SGD": 1e-1, "nerofy": 1e-2}


# ------------------------------------------------------------------------------------------------
# data and models
# ------------------------------------------------------------------------------------------------
def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=450, random_state=0, stratify=y)
    Xfit, Xval, yfit, yval = train_test_split(Xtr, ytr, test_size=0.2, random_state=1, stratify=ytr)

    def norm(a, ref):
        mu, sd = ref.mean(0), ref.std(0)
        return torch.tensor((a - mu) / np.maximum(sd, 0.1))

    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return {
        "test": (norm(Xtr, Xtr), t(ytr), norm(Xte, Xtr), t(yte)),
        "val": (norm(Xfit, Xfit), t(yfit), norm(Xval, Xfit), t(yval)),
    }


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
        self.body = nn.Sequential(block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 64),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x.view(-1, 1, 8, 8)))


def make_model(name: str) -> nn.Module:
    if name == "mlp3":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "cnn_bn":
        return CNN()
    if name.startswith("deep"):
        depth, width = int(name[4:]), 128
        layers = [nn.Linear(64, width), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers)
    raise ValueError(name)


def make_optimizer(model: nn.Module, kind: str, lr: float, xcal: torch.Tensor):
    """Returns (model, optimizer); nerofy kinds rewrite the model in place."""
    if kind.startswith("nerofy"):
        mode = {"nerofy init": "init"}.get(kind, "unit" if kind in ("nerofy unit", "nerofy calibrated") else None)
        kw = {} if mode is None else {"scale": mode}
        model, opt = nerofy.wrap(model, lr=lr, example_inputs=(xcal[:2],), **kw)
        if kind == "nerofy calibrated":
            nerofy.calibrate_(model, (xcal,))
        return model, opt
    if kind == "pytorch_optimizer Nero":
        from pytorch_optimizer import Nero as PONero
        return model, PONero(model.parameters(), lr=lr)
    if kind == "Adam":
        return model, torch.optim.Adam(model.parameters(), lr=lr)
    if kind == "AdamW":
        return model, torch.optim.AdamW(model.parameters(), lr=lr)
    if kind == "SGD":
        return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    raise ValueError(kind)


@torch.no_grad()
def accuracy(model, X, y):
    model.eval()
    out = model(X)
    model.train()
    return float((out.argmax(1) == y).float().mean())


def train(model_name, kind, lr, seed, data, epochs, batch=64):
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = make_model(model_name)
    g = torch.Generator().manual_seed(1000 + seed)
    xcal = Xtr[torch.randperm(len(Xtr), generator=g)[:256]]
    t0 = time.perf_counter()
    model, opt = make_optimizer(model, kind, lr, xcal)
    curve, losses = [], []
    diverged = False
    for ep in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        tot, n = 0.0, 0
        # full batches only: the ragged tail (1347 = 21 x 64 + 3) would be a 3-sample step, and
        # Nero (no momentum) takes it at full size in a noisy direction (docs/results.md §1b)
        for i in range(0, len(Xtr) - batch + 1, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss) * len(idx)
            n += len(idx)
        losses.append(tot / n)
        curve.append(accuracy(model, Xte, yte))
        if not math.isfinite(losses[-1]):
            diverged = True
            curve += [curve[-1]] * (epochs - ep - 1)
            losses += [float("nan")] * (epochs - ep - 1)
            break
    return {"model": model_name, "opt": kind, "lr": lr, "seed": seed, "acc": curve[-1], "best_acc": max(curve),
            "curve": curve, "train_loss": losses, "time_s": time.perf_counter() - t0, "diverged": diverged}


# ------------------------------------------------------------------------------------------------
def pick_lr(scores: dict, kind: str) -> float:
    """The swept rate with the best score; ties go to the rate closest to the default (in log)."""
    return max(scores, key=lambda lr: (scores[lr], -abs(math.log(lr / DEFAULT_LR[kind]))))


def finish(res, a) -> None:
    """Plots, the tables as Markdown next to the JSON, and the tables on stdout."""
    plot(res, a.plots)
    (a.out / f"{a.name}.md").write_text(table(res) + "\n")
    print(table(res))


def fmt_lr(lr):
    return f"{lr:g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp3", "cnn_bn", "deep5", "deep10", "deep20", "deep50"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30, help="epochs of the final runs")
    ap.add_argument("--sweep-epochs", type=int, default=15, help="epochs of the lr sweep (1 seed, validation split)")
    ap.add_argument("--deep-epochs", type=int, default=None, help="final-run epochs for deep MLPs (default: --epochs)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 models, tiny sweep, 1 seed, few epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--plots", type=Path, default=HERE.parent / "docs")
    ap.add_argument("--name", default="train_digits", help="JSON file name (without .json) under --out")
    ap.add_argument("--sweep-deep-epochs", type=int, default=10, help="sweep epochs for deep MLPs")
    ap.add_argument("--reuse-sweep", type=Path, nargs="+", help="take sweep results for these models from JSON")
    ap.add_argument("--merge", type=Path, nargs="+", help="only merge these JSON files into --name and plot")
    ap.add_argument("--configs", nargs="+", help="run only these final-run labels (e.g. 'AdamW default'), to fill "
                                                 "cells missing from an earlier run; merge afterwards")
    a = ap.parse_args(argv)
    if a.merge:
        a.merge = [f for f in a.merge if f.exists()]
        parts = [json.loads(f.read_text()) for f in a.merge]
        res = {"meta": dict(parts[0]["meta"], parts=[str(f.name) for f in a.merge],
                            total_s=sum(p["meta"].get("total_s", 0) for p in parts)),
               "sweep": [r for p in parts for r in p["sweep"]], "runs": [r for p in parts for r in p["runs"]]}
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
        finish(res, a)
        return
    if a.quick:
        a.models, a.seeds, a.epochs, a.sweep_epochs, a.sweep_deep_epochs = ["mlp3", "deep10"], [0], 3, 2, 2
        for k in SWEEP:
            SWEEP[k] = SWEEP[k][1:4:2]
    torch.set_num_threads(a.threads)
    data = load_data()
    a.out.mkdir(parents=True, exist_ok=True)
    a.plots.mkdir(parents=True, exist_ok=True)
    res = {"meta": {"torch": torch.__version__, "nerofy": nerofy.__version__, "python": platform.python_version(),
                    "threads": a.threads, "seeds": a.seeds, "epochs": a.epochs, "sweep_epochs": a.sweep_epochs, "sweep_deep_epochs": a.sweep_deep_epochs,
                    "deep_epochs": a.deep_epochs or a.epochs, "quick": a.quick, "batch": 64,
                    "split": "train 1347 / test 450 (stratified, random_state=0); sweep on 20% of train as validation",
                    "sweep_grid": SWEEP, "nerofy_default_scale": LIB_DEFAULT, "default_lr": DEFAULT_LR},
           "sweep": [], "runs": []}
    out_json = a.out / f"{a.name}.json"
    T0 = time.perf_counter()

    def save():
        out_json.write_text(json.dumps(res, indent=1))

    for m in a.models:
        ep = (a.deep_epochs or a.epochs) if m.startswith("deep") else a.epochs
        best = dict(DEFAULT_LR)
        reused = [r for f in (a.reuse_sweep or []) for r in json.loads(f.read_text())["sweep"] if r["model"] == m]
        if not a.no_sweep:
            for kind, grid in SWEEP.items():
                scores = {}
                old = {r["lr"]: r for r in reused if r["opt"] == kind}
                if old:
                    grid = sorted(old)
                for lr in grid:
                    r = old.get(lr) or train(m, kind, lr, 0, data["val"],
                                             a.sweep_deep_epochs if m.startswith("deep") else a.sweep_epochs)
                    r["split"] = "val"
                    res["sweep"].append(r)
                    scores[lr] = r["acc"]
                best[kind] = pick_lr(scores, kind)
                print(f"[{time.perf_counter() - T0:6.0f}s] {m:7s} sweep {kind:6s} " +
                      " ".join(f"{fmt_lr(lr)}:{s:.3f}" for lr, s in scores.items()) + f"  -> {fmt_lr(best[kind])}",
                      flush=True)
            save()
        configs = [("nerofy", "nerofy", DEFAULT_LR["nerofy"])]
        configs += [(f"nerofy {mode}", f"nerofy {mode}", 1e-2) for mode in ("unit", "init") if mode != LIB_DEFAULT]
        configs += [("nerofy calibrated", "nerofy calibrated", 1e-2),
                   ("pytorch_optimizer Nero", "pytorch_optimizer Nero", 1e-2)]
        for kind in ("Adam", "AdamW", "SGD"):
            configs.append((f"{kind} default", kind, DEFAULT_LR[kind]))
        if not a.no_sweep:
            for kind in ("Adam", "AdamW", "SGD", "nerofy"):
                configs.append((f"{kind} tuned", kind, best[kind]))
        if a.configs:
            unknown = set(a.configs) - {c[0] for c in configs}
            if unknown:
                ap.error(f"--configs: no config {', '.join(sorted(unknown))}; known: {', '.join(c[0] for c in configs)}")
            configs = [c for c in configs if c[0] in a.configs]
        done = {}
        for label, kind, lr in configs:
            accs = []
            for s in a.seeds:
                if (kind, lr, s) in done:  # a tuned lr equal to the default: same run, not repeated
                    r = dict(done[(kind, lr, s)], reused_from=done[(kind, lr, s)]["label"])
                else:
                    r = train(m, kind, lr, s, data["test"], ep)
                    done[(kind, lr, s)] = r
                r["label"] = label
                r["split"] = "test"
                res["runs"].append(r)
                accs.append(r["acc"])
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"[{time.perf_counter() - T0:6.0f}s] {m:7s} {label:24s} lr {fmt_lr(lr):6s} "
                  f"test acc {statistics.mean(accs):.3f} +- {sd:.3f}", flush=True)
            save()
    res["meta"]["total_s"] = time.perf_counter() - T0
    save()
    finish(res, a)
    print(f"wrote {out_json}, its tables ({a.name}.md) and plots in {a.plots}")


# ------------------------------------------------------------------------------------------------
def summarize(res):
    rows = {}
    for r in res["runs"]:
        rows.setdefault((r["model"], r["label"]), []).append(r)
    out = {}
    for (m, label), rs in rows.items():
        accs = [r["acc"] for r in rs]
        tail = [statistics.mean(r["curve"][-5:]) for r in rs]  # the last epochs: less noisy than the final one
        out[(m, label)] = {"lr": rs[0]["lr"], "mean": statistics.mean(accs),
                           "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                           "last5": statistics.mean(tail), "last5_std": statistics.stdev(tail) if len(tail) > 1 else 0.0,
                           "time": statistics.mean(r["time_s"] for r in rs), "n": len(rs),
                           "diverged": sum(r["diverged"] for r in rs)}
    return out


def table(res):
    s = summarize(res)
    models = list(dict.fromkeys(m for m, _ in s))
    labels = list(dict.fromkeys(lab for _, lab in s))
    lines = ["| config | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for lab in labels:
        cells = []
        for m in models:
            v = s.get((m, lab))
            if v is None:
                cells.append("")
                continue
            d = f" ({v['diverged']} div.)" if v["diverged"] else ""
            cells.append(f"{v['mean']:.3f} ± {v['std']:.3f} @{fmt_lr(v['lr'])}, {v['time']:.1f}s{d}")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "Mean test accuracy over the last 5 epochs (mean ± std over seeds):", "",
              "| config | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(f"{s[(m, lab)]['last5']:.3f} ± {s[(m, lab)]['last5_std']:.3f}"
                                                 if (m, lab) in s else "" for m in models) + " |")
    if res.get("sweep"):
        kinds = list(dict.fromkeys(r["opt"] for r in res["sweep"]))
        lines += ["", "Learning-rate sweeps (validation accuracy, seed 0; bold = chosen):", "",
                  "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for m in dict.fromkeys(r["model"] for r in res["sweep"]):
            cells = []
            for k in kinds:
                scores = {r["lr"]: r["acc"] for r in res["sweep"] if r["model"] == m and r["opt"] == k}
                best = pick_lr(scores, k) if scores else None
                cells.append(" ".join((f"**{fmt_lr(lr)}: {acc:.2f}**" if lr == best else f"{fmt_lr(lr)}: {acc:.2f}")
                                      for lr, acc in sorted(scores.items())))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res, folder: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(res)
    models = list(dict.fromkeys(m for m, _ in s))
    deep = sorted([m for m in models if m.startswith("deep")], key=lambda m: int(m[4:]))
    if deep:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for lab in ["nerofy", "nerofy init", "nerofy calibrated", "pytorch_optimizer Nero", "Adam default",
                    "Adam tuned", "AdamW tuned", "SGD default", "SGD tuned"]:
            pts = [(int(m[4:]), s[(m, lab)]) for m in deep if (m, lab) in s]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                            marker="o", capsize=3, label=lab, ls="--" if "tuned" in lab else "-")
        ax.set_xscale("log")
        ax.set_xticks([int(m[4:]) for m in deep], [m[4:] for m in deep])
        ax.set_xlabel("depth (linear layers, width 128, ReLU, no normalisation)")
        ax.set_ylabel("test accuracy")
        ax.set_title("digits: plain deep MLPs")
        ax.axhline(0.1, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(folder / "digits_depth.png", dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(models), figsize=(3.3 * len(models), 3.3), squeeze=False)
    for ax, m in zip(axes[0], models):
        for lab in ["nerofy", "pytorch_optimizer Nero", "Adam default", "AdamW default", "SGD default",
                    "Adam tuned", "SGD tuned"]:
            rs = [r for r in res["runs"] if r["model"] == m and r["label"] == lab]
            if not rs:
                continue
            c = np.mean([r["curve"] for r in rs], axis=0)
            ax.plot(np.arange(1, len(c) + 1), c, label=lab, ls="--" if "tuned" in lab else "-")
        ax.set_title(m)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("test accuracy (mean of seeds)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "digits_curves.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
