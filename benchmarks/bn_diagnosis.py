"""Is Nero's erratic test accuracy on the digits BN CNN a BatchNorm running-statistics lag?

Trains cnn_bn of train_digits.py (nerofy at lr 0.01 and Adam at 1e-3, 30 epochs, seeds 0-2, same
data and init) and scores each epoch twice: with the BatchNorm running statistics as training left
them, and after re-estimating them on the train set with the current weights (a cumulative average).

    python benchmarks/bn_diagnosis.py [--quick]     # prints one line per run; writes results/bn_diagnosis.json
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import train_digits as T  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
ap.add_argument("--out", type=Path, default=HERE / "results")
ap.add_argument("--plots", type=Path, default=None, help="unused (no plot); accepted for uniformity")
a = ap.parse_args()
EPOCHS, SEEDS = (3, (0,)) if a.quick else (30, (0, 1, 2))
torch.set_num_threads(1)
data = T.load_data()["test"]
Xtr, ytr, Xte, yte = data

@torch.no_grad()
def recal_acc(model):
    # re-estimate BN running stats on the train set with the current weights (cumulative average)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats(); m.momentum = None
    model.train()
    for i in range(0, len(Xtr), 64):
        model(Xtr[i:i + 64])
    acc = T.accuracy(model, Xte, yte)
    for m, (mom, rm, rv) in zip(bns, saved):
        m.momentum = mom; m.running_mean.copy_(rm); m.running_var.copy_(rv)
    return acc

runs = []
for kind, lr in (("nerofy", 0.01), ("Adam", 1e-3)):
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = T.make_model("cnn_bn")
        g = torch.Generator().manual_seed(1000 + seed)
        xcal = Xtr[torch.randperm(len(Xtr), generator=g)[:256]]
        model, opt = T.make_optimizer(model, kind, lr, xcal)
        plain, recal = [], []
        for ep in range(EPOCHS):
            perm = torch.randperm(len(Xtr), generator=g)
            for i in range(0, len(Xtr) - 63, 64):  # full batches, as train_digits.py
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            plain.append(T.accuracy(model, Xte, yte)); recal.append(recal_acc(model))
        print(f"{kind} lr {lr} seed {seed}: running-stats acc min/last5/final {min(plain[EPOCHS // 3:]):.3f}/{statistics.mean(plain[-5:]):.3f}/{plain[-1]:.3f}"
              f" | recalibrated BN min/last5/final {min(recal[EPOCHS // 3:]):.3f}/{statistics.mean(recal[-5:]):.3f}/{recal[-1]:.3f}", flush=True)
        runs.append({"opt": kind, "lr": lr, "seed": seed, "running_stats": plain, "recalibrated": recal})
summary = {k: {m: round(statistics.mean(statistics.mean(r[m][-5:]) for r in runs if r["opt"] == k), 4)
               for m in ("running_stats", "recalibrated")} for k in ("nerofy", "Adam")}
print("mean of the last 5 epochs:", summary)
a.out.mkdir(parents=True, exist_ok=True)
(a.out / ("bn_diagnosis_quick.json" if a.quick else "bn_diagnosis.json")).write_text(
    json.dumps({"meta": {"quick": a.quick, "epochs": EPOCHS, "seeds": list(SEEDS)}, "summary": summary, "runs": runs},
               indent=1))
