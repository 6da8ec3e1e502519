"""Which fixed gain should a balanced layer fed by ReLU get? A sweep on plain deep ReLU MLPs.

Digits (1400 train / 397 test, stratified, random_state=0, standardised), Linear(64,W), ReLU,
(D-2) x [Linear(W,W), ReLU], Linear(W,10); 30 epochs of batch 50 (full batches), Nero lr 0.01
through nerofy.wrap(update="paper"), one thread. Configurations (comma-separated):

  signal-paper / signal-projected   wrap(scale="signal"): the library's gain (1/rms(phi(z)), sqrt(2))
  unit-paper / unit-projected       wrap(scale="unit"): the paper's gain 1
  g<x>-paper                        every ReLU-fed layer's gain overridden to x (1.713 = 1/std(relu(z)))
  paper                             pytorch_optimizer's Nero on the plain model

    python benchmarks/gain_sweep.py DEPTH WIDTH CONFIGS SEEDS    # e.g. 20 64 signal-paper,g1.713-paper 10

Prints one line per configuration: mean and worst final test accuracy over seeds 0..SEEDS-1.
(The logs of the runs quoted in docs/results.md §0 are in benchmarks/results/gain_sweep.txt.)
"""
import logging
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import nerofy

logging.getLogger("nerofy").setLevel(logging.ERROR)


def data():
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) / 16
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=397, random_state=0, stratify=y)
    mu, sd = Xtr.mean(0), np.maximum(Xtr.std(0), 0.1)
    return torch.tensor((Xtr - mu) / sd), torch.tensor(ytr), torch.tensor((Xte - mu) / sd), torch.tensor(yte)


def mlp(depth, width):
    layers = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def build(cfg, m, x0):
    if cfg == "paper":
        from pytorch_optimizer import Nero
        return m, Nero(m.parameters(), lr=0.01)
    scale, update = cfg.split("-")
    plan = nerofy.plan(m, (x0,))
    if scale.startswith("g"):  # a fixed gain on every activation-fed layer
        for e in plan:
            if e.role == "neuron" and e.signal is not None:
                plan.override(e.name, gain=float(scale[1:]))
        scale = "signal"
    return nerofy.wrap(m, plan=plan, scale=scale, update=update)


def main(depth, width, cfgs, n_seeds):
    torch.set_num_threads(1)
    Xtr, ytr, Xte, yte = data()
    for cfg in cfgs:
        accs, t0 = [], time.time()
        for seed in range(n_seeds):
            torch.manual_seed(seed)
            m, opt = build(cfg, mlp(depth, width), Xtr[:2])
            g = torch.Generator().manual_seed(seed)
            for _ in range(30):
                perm = torch.randperm(len(Xtr), generator=g)
                for i in range(0, len(Xtr) - 50 + 1, 50):
                    idx = perm[i:i + 50]
                    loss = F.cross_entropy(m(Xtr[idx]), ytr[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            m.eval()
            with torch.no_grad():
                accs.append(float((m(Xte).argmax(1) == yte).float().mean()))
        print(cfg, depth, width, "mean %.3f min %.3f" % (np.mean(accs), np.min(accs)), ["%.3f" % a for a in accs],
              "%.0fs" % (time.time() - t0), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4]))
