"""timm models end to end on scikit-learn's digits: nerofy.wrap + Nero (defaults) against AdamW
(defaults), learning curves.

Data: the same fixed split as train_digits.py (1347 train / 450 test), images upsampled bilinearly
from 8x8 to ``--size`` (16) pixels, one channel, standardised. Models from timm, random init:
  resnet18      timm.create_model("resnet18", in_chans=1, num_classes=10)
  vit_tiny      timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=2, depth=6,
                in_chans=1, num_classes=10)    (a 6-block ViT-Tiny: 64 patches of 2x2)
By default only the first 640 of a fresh permutation of the train set are used per epoch
(``--train-limit``; 0 for all), 4 epochs: what a shared 2-core machine could afford.
Configurations: nerofy.wrap(model) (lr 0.01, nothing tuned) and torch AdamW at its defaults
(lr 1e-3, weight_decay 1e-2). Batch 64, no augmentation, no schedule. Test accuracy every epoch.

    python benchmarks/train_timm_digits.py            # full run
    python benchmarks/train_timm_digits.py --quick    # smoke run

Writes benchmarks/results/train_timm_digits.json and docs/timm_digits.png (``--out``, ``--plots``).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import nerofy  # noqa: E402
from train_digits import load_data  # noqa: E402

logging.getLogger("nerofy").setLevel(logging.ERROR)

CONFIGS = [("nerofy", 1e-2), ("AdamW default", 1e-3)]


def create(key, size, quick=False):
    import timm
    if key == "resnet18":
        return timm.create_model("resnet18", in_chans=1, num_classes=10)
    if key == "vit_tiny":
        return timm.create_model("vit_tiny_patch16_224", img_size=size, patch_size=2 if size <= 16 else 4,
                                 depth=2 if quick else 6,
                                 in_chans=1, num_classes=10)
    raise ValueError(key)


def images(X, size):
    return F.interpolate(X.view(-1, 1, 8, 8), size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def accuracy(model, X, y, bs=256):
    model.eval()
    hits = sum(int((model(X[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(X), bs))
    model.train()
    return hits / len(X)


def run(key, label, lr, seed, data, a, log):
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    model = create(key, a.size, a.quick)
    if label.startswith("nerofy"):
        model, opt = nerofy.wrap(model, lr=lr, example_inputs=(Xtr[:2],))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1000 + seed)
    curve, losses = [], []
    t0 = time.perf_counter()
    n = a.train_limit or len(Xtr)
    for ep in range(a.epochs):
        perm = torch.randperm(len(Xtr), generator=g)[:n]
        tot = 0.0
        seen = 0
        for i in range(0, n - a.batch + 1, a.batch):  # full batches only, as in train_digits.py
            idx = perm[i:i + a.batch]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            seen += len(idx)
        losses.append(tot / seen)
        curve.append(accuracy(model, Xte, yte))
        log(f"  {key} {label} seed {seed} epoch {ep + 1}: train loss {losses[-1]:.3f}  test acc {curve[-1]:.3f}")
    return {"model": key, "label": label, "lr": lr, "seed": seed, "curve": curve, "train_loss": losses,
            "acc": curve[-1], "time_s": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "vit_tiny"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=640, help="train on this many of the 1347 (0: all)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--plots", type=Path, default=HERE.parent / "docs")
    a = ap.parse_args(argv)
    if a.quick:
        a.epochs, a.size, a.train_limit, a.seeds, a.models = 1, 16, 128, [0], ["vit_tiny"]
    torch.set_num_threads(a.threads)
    d = load_data()["test"]
    data = (images(d[0], a.size), d[1], images(d[2], a.size), d[3])
    T0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)

    res = {"meta": {"torch": torch.__version__, "nerofy": nerofy.__version__, "python": platform.python_version(),
                    "quick": a.quick, **{k: getattr(a, k) for k in ("epochs", "batch", "size", "seeds", "threads")}},
           "runs": []}
    a.out.mkdir(parents=True, exist_ok=True)
    a.plots.mkdir(parents=True, exist_ok=True)
    for key in a.models:
        for seed in a.seeds:
            for label, lr in CONFIGS:
                r = run(key, label, lr, seed, data, a, log)
                res["runs"].append(r)
                log(f"{key} {label} seed {seed}: test acc {r['acc']:.3f} in {r['time_s']:.0f}s")
                (a.out / "train_timm_digits.json").write_text(json.dumps(res, indent=1))
    plot(res, a.plots)
    log(f"wrote {a.out / 'train_timm_digits.json'} and {a.plots / 'timm_digits.png'}")


def plot(res, folder):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in res["runs"]))
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6), squeeze=False)
    for j, m in enumerate(models):
        for i, (label, _) in enumerate(CONFIGS):
            for k, r in enumerate(x for x in res["runs"] if x["model"] == m and x["label"] == label):
                ep = range(1, len(r["curve"]) + 1)
                kw = dict(color=f"C{i}", label=label if k == 0 else None, alpha=1 if k == 0 else 0.5)
                axes[0][j].plot(ep, r["curve"], **kw)
                axes[1][j].plot(ep, r["train_loss"], **kw)
        axes[0][j].set_title(f"timm {m} on digits (upsampled)")
        axes[0][j].set_ylabel("test accuracy")
        axes[1][j].set_ylabel("train loss")
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("epoch")
        axes[0][j].legend()
    fig.tight_layout()
    fig.savefig(folder / "timm_digits.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
