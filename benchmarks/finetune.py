"""Fine-tuning trained models with nerofy (issue 17): does wrapping keep what the model learned?

Task: scikit-learn's digits (the fixed 1400/397 split of tq_models.digits). A model is trained with
AdamW (lr 1e-3) on the clean images, then fine-tuned on a noisy version of the same split (Gaussian
noise of 0.3 in [0, 1] pixel units, one fixed draw; standardised with the clean train statistics,
as the trained model expects). (A one-pixel shift was tried first: with border pixels standardised
by a floored std it leaves the trained MLP at chance, 0.16, so nothing is kept to lose.) Test
accuracy on the noisy test set right after the conversion (epoch 0: what wrapping did to the trained
function) and after every fine-tuning epoch, and on the clean test set at the end (what is left of
the original task).

Models (random init, then trained here): ``mlp`` (64-256-256-10 ReLU), ``cnn`` (two conv + BatchNorm
+ ReLU blocks, 4x4 average pool, linear head; 16x16 images), ``resnet18`` (timm, one input channel, 16x16 images: a timm model
converted from its own trained state).

Fine-tuning configurations: nerofy with ``keep="function"`` (lr 0.01, its default), nerofy's plain
wrap (``keep="direction"``, the default for fresh models), the plain wrap followed by
``nerofy.reestimate_bn`` on 10 fine-tuning batches (BatchNorm models), AdamW at 1e-4 and 1e-3, and
SGD (lr 0.01, momentum 0.9). Batch 50, no schedule, one thread, 3 seeds (each seed trains its own
model and shuffles the fine-tuning data its own way; every configuration of a seed starts from the
same trained weights).

    python benchmarks/finetune.py                      # everything (resumable: finished rows are kept)
    python benchmarks/finetune.py --bench mlp --seeds 0
    python benchmarks/finetune.py --summary            # tables from the JSONL, also written as .md

Rows go to benchmarks/results/finetune.jsonl; trained models are cached under
benchmarks/results/finetune_trained/ (not committed).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import nerofy  # noqa: E402
from train_timm_digits import images  # noqa: E402

logging.getLogger("nerofy").setLevel(logging.ERROR)
RESULTS = HERE / "results"
NOISE = 0.3


# ---- data -----------------------------------------------------------------------------------------
def load(size: int | None):
    """(clean train, clean test, noisy train, noisy test), each (X, y); flat 64 features when
    ``size`` is None, else 1-channel images upsampled to ``size``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=397, random_state=0, stratify=y)
    rng = np.random.default_rng(1234)

    def noisy(a):
        return (a + NOISE * rng.standard_normal(a.shape)).astype(np.float32)

    mu, sd = Xtr.mean(0), np.maximum(Xtr.std(0), 0.1)

    def prep(a):
        t = torch.tensor((a - mu) / sd, dtype=torch.float32)
        return t if size is None else images(t, size)

    ytr_t, yte_t = torch.tensor(ytr, dtype=torch.long), torch.tensor(yte, dtype=torch.long)
    return (prep(Xtr), ytr_t), (prep(Xte), yte_t), (prep(noisy(Xtr)), ytr_t), (prep(noisy(Xte)), yte_t)


# ---- models ---------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10))


def resnet18() -> nn.Module:
    import timm
    return timm.create_model("resnet18", in_chans=1, num_classes=10)


@dataclass
class Bench:
    build: Callable[[], nn.Module]
    size: int | None          # image size (None: flat features)
    pre_epochs: int           # AdamW epochs on the clean data
    epochs: int               # fine-tuning epochs
    bn: bool = False


BENCHES = {"mlp": Bench(mlp, None, 20, 5), "cnn": Bench(cnn, 16, 10, 5, bn=True),
           "resnet18": Bench(resnet18, 16, 6, 3, bn=True)}
BATCH = 50


# ---- fine-tuning configurations: (trained model, example batch) -> (model, optimizer) -------------
def _nerofy(keep: str, reestimate: bool = False):
    def build(model, ex, ft_batches):
        model, opt = nerofy.wrap(model, lr=0.01, example_inputs=(ex,), keep=keep)
        if reestimate:
            nerofy.reestimate_bn(model, ft_batches, max_batches=10)
        return model, opt
    return build


def _torch(make):
    return lambda model, ex, ft_batches: (model, make(model.parameters()))


CONFIGS = {
    "nerofy keep=function": _nerofy("function"),
    "nerofy (plain wrap)": _nerofy("direction"),
    "nerofy + reestimate_bn": _nerofy("direction", reestimate=True),
    "AdamW 1e-4": _torch(lambda p: torch.optim.AdamW(p, lr=1e-4)),
    "AdamW 1e-3": _torch(lambda p: torch.optim.AdamW(p, lr=1e-3)),
    "SGD 0.01 m0.9": _torch(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
}


def applies(bench: str, config: str) -> bool:
    return BENCHES[bench].bn or "reestimate" not in config


# ---- training -------------------------------------------------------------------------------------
def batches(X, y, epochs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        yield [(X[perm[i:i + BATCH]], y[perm[i:i + BATCH]]) for i in range(0, len(X) - BATCH + 1, BATCH)]


@torch.no_grad()
def accuracy(model, data) -> float:
    X, y = data
    was = model.training
    model.eval()
    try:
        return sum(int((model(X[i:i + 256]).argmax(-1) == y[i:i + 256]).sum()) for i in range(0, len(X), 256)) / len(X)
    finally:
        model.train(was)


def train_epoch(model, opt, epoch) -> float:
    losses = []
    for x, t in epoch:
        loss = F.cross_entropy(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return statistics.fmean(losses)


def trained(name: str, seed: int, data, log) -> nn.Module:
    """The AdamW-trained model of (bench, seed), from the cache when it is there."""
    bench = BENCHES[name]
    path = RESULTS / "finetune_trained" / f"{name}_seed{seed}.pt"
    torch.manual_seed(seed)
    model = bench.build()
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for ep in batches(*data[0], bench.pre_epochs, 1000 + seed):
        train_epoch(model, opt, ep)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    log(f"{name} seed {seed}: trained with AdamW ({bench.pre_epochs} epochs, {time.perf_counter() - t0:.0f}s): "
        f"clean test {accuracy(model, data[1]):.4f}, noisy test {accuracy(model, data[3]):.4f}")
    return model


def run_one(name: str, config: str, seed: int, data, log) -> dict:
    bench = BENCHES[name]
    base = trained(name, seed, data, log)
    t0 = time.perf_counter()
    ft = list(batches(*data[2], bench.epochs, 2000 + seed))
    model = copy.deepcopy(base)
    before = accuracy(model, data[3])
    with torch.no_grad():
        ref = model.eval()(data[3][0][:64])
    model.train()
    model, opt = CONFIGS[config](model, data[2][0][:2], [x for x, _ in ft[0]])
    with torch.no_grad():
        out = model.eval()(data[3][0][:64])
    model.train()
    row = {"bench": name, "config": config, "seed": seed, "trained_clean_acc": accuracy(base, data[1]),
           "trained_noisy_acc": before, "wrap_max_abs_diff": float((out - ref).abs().max()),
           "wrap_rel_diff": float((out - ref).abs().max() / ref.abs().max()),
           "curve": [accuracy(model, data[3])], "train_loss": [], "clean_after": None}
    for ep in ft:
        row["train_loss"].append(train_epoch(model, opt, ep))
        row["curve"].append(accuracy(model, data[3]))
    row["clean_after"] = accuracy(model, data[1])  # what is left of the original task
    row["time_s"] = round(time.perf_counter() - t0, 2)
    return row


# ---- results ----------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _ms(xs) -> str:
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def summary(rows: list[dict]) -> str:
    out = []
    for b in BENCHES:
        br = [r for r in rows if r["bench"] == b]
        if not br:
            continue
        seeds = sorted({r["seed"] for r in br})
        tr = {r["seed"]: (r["trained_clean_acc"], r["trained_noisy_acc"]) for r in br}
        out.append(f"### {b} (seeds {', '.join(map(str, seeds))}; {BENCHES[b].epochs} fine-tuning epochs)\n")
        out.append(f"Trained with AdamW: clean test {_ms([tr[s][0] for s in seeds])}, noisy test "
                   f"{_ms([tr[s][1] for s in seeds])} (mean ± std over seeds).\n")
        n_ep = BENCHES[b].epochs
        out.append("| config | seeds | max rel. output change at wrap | at wrap | "
                   + " | ".join(f"epoch {i}" for i in range(1, n_ep + 1)) + " | clean test after |")
        out.append("|---|---|---|---|" + "---|" * n_ep + "---|")
        for c in CONFIGS:
            cr = [r for r in br if r["config"] == c]
            if not cr:
                continue
            cells = [_ms([r["curve"][i] for r in cr]) for i in range(n_ep + 1)]
            out.append(f"| {c} | {len(cr)} | {max(r['wrap_rel_diff'] for r in cr):.1e} | " + " | ".join(cells)
                       + f" | {_ms([r['clean_after'] for r in cr])} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="LABEL")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS / "finetune.jsonl")
    ap.add_argument("--summary", action="store_true")
    a = ap.parse_args(argv)
    if a.summary:
        text = summary(read_rows(a.out))
        print(text)
        a.out.with_suffix(".md").write_text(f"# Fine-tuning trained models ({a.out.name})\n\n{text}\n")
        return
    torch.set_num_threads(1)
    done = {(r["bench"], r["config"], r["seed"]) for r in read_rows(a.out)}
    T0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)

    a.out.parent.mkdir(parents=True, exist_ok=True)
    for b in a.bench:
        data = load(BENCHES[b].size)
        for seed in a.seeds:
            for c in a.configs:
                if not applies(b, c) or (b, c, seed) in done:
                    continue
                row = run_one(b, c, seed, data, log)
                row.update(torch=torch.__version__, threads=1)
                with a.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"{b} {c} seed {seed}: wrap rel. diff {row['wrap_rel_diff']:.1e}, acc at wrap {row['curve'][0]:.4f}"
                    f" -> {' '.join(f'{v:.3f}' for v in row['curve'][1:])} ({row['time_s']:.0f}s)")


if __name__ == "__main__":
    main()
