"""A small character-level transformer language model: nerofy + Nero against AdamW.

The text is the source of a few Python standard-library modules (shipped with every Python, so no
download): the first 90% of their concatenation trains, the last 10% validates. ASCII bytes (others
become '?'), vocabulary 128. The model is written here: token + learned position embeddings,
pre-LayerNorm blocks with causal self-attention (F.scaled_dot_product_attention) and a GELU MLP,
a final LayerNorm and an untied linear head.

Configurations (the paper trained its transformer with Nero at lr 1e-3, so both are reported):
  nerofy lr 0.01     nerofy.wrap(model)            (library defaults)
  nerofy lr 0.001    nerofy.wrap(model, lr=1e-3)
  AdamW default      torch.optim.AdamW(lr=1e-3, weight_decay=1e-2)
  AdamW lr 3e-3      (a common transformer-tuned rate)

Same init, data order and batches for every configuration; validation loss (nats per character)
on fixed held-out batches every ``--eval-every`` steps.

    python benchmarks/char_lm.py            # full run
    python benchmarks/char_lm.py --quick    # smoke run

Writes benchmarks/results/char_lm.json and docs/char_lm.png (``--out``, ``--plots``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import nerofy  # noqa: E402

logging.getLogger("nerofy").setLevel(logging.ERROR)

MODULES = ["argparse.py", "inspect.py", "typing.py", "dataclasses.py", "textwrap.py", "pathlib.py",
           "functools.py", "enum.py"]
CONFIGS = [("nerofy lr 0.01", "nerofy", 1e-2), ("nerofy lr 0.001", "nerofy", 1e-3),
           ("AdamW default", "AdamW", 1e-3), ("AdamW lr 3e-3", "AdamW", 3e-3)]


def load_text():
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in MODULES if (lib / f).exists()]
    text = "\n".join((lib / f).read_text(encoding="utf-8", errors="replace") for f in files)
    data = torch.tensor([b if b < 128 else ord("?") for b in text.encode("utf-8", "replace")], dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:], files


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab=128, d=128, layers=3, heads=4, ctx=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, ctx, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, :idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def batches(data, n, batch, ctx, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ix = torch.randint(0, len(data) - ctx - 1, (batch,), generator=g)
        yield torch.stack([data[i:i + ctx] for i in ix]), torch.stack([data[i + 1:i + ctx + 1] for i in ix])


@torch.no_grad()
def evaluate(model, val_batches):
    model.eval()
    tot = sum(float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())) for x, y in val_batches)
    model.train()
    return tot / len(val_batches)


def run(label, kind, lr, a, train, val_batches, seed, log):
    torch.manual_seed(seed)
    model = CharLM(d=a.d, layers=a.layers, heads=a.heads, ctx=a.ctx)
    x0 = train[:a.ctx].unsqueeze(0)
    if kind == "nerofy":
        model, opt = nerofy.wrap(model, lr=lr, example_inputs=(x0,))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    curve = [(0, evaluate(model, val_batches))]
    train_loss = []
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches(train, a.steps, a.batch, a.ctx, 100 + seed), 1):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_loss.append(float(loss))
        if step % a.eval_every == 0 or step == a.steps:
            curve.append((step, evaluate(model, val_batches)))
            log(f"  {label} seed {seed} step {step}: train {sum(train_loss[-a.eval_every:]) / len(train_loss[-a.eval_every:]):.3f}"
                f"  val {curve[-1][1]:.3f}")
    return {"label": label, "opt": kind, "lr": lr, "seed": seed, "val_curve": curve, "train_loss": train_loss,
            "final_val": curve[-1][1], "time_s": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--plots", type=Path, default=HERE.parent / "docs")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.d, a.layers, a.eval_every, a.val_batches, a.seeds = 10, 32, 1, 5, 2, [0]
    torch.set_num_threads(a.threads)
    train, val, files = load_text()
    val_batches = list(batches(val, a.val_batches, a.batch, a.ctx, 7))
    T0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)

    log(f"text: {len(train) + len(val)} characters from {', '.join(files)}; uniform loss = {math.log(128):.3f}")
    res = {"meta": {"torch": torch.__version__, "nerofy": nerofy.__version__, "python": platform.python_version(),
                    "files": files, "train_chars": len(train), "val_chars": len(val), "quick": a.quick,
                    **{k: getattr(a, k) for k in ("steps", "batch", "ctx", "d", "layers", "heads", "eval_every",
                                                  "val_batches", "seeds", "threads")}},
           "runs": []}
    a.out.mkdir(parents=True, exist_ok=True)
    a.plots.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        for label, kind, lr in CONFIGS:
            r = run(label, kind, lr, a, train, val_batches, seed, log)
            res["runs"].append(r)
            log(f"{label} seed {seed}: final val {r['final_val']:.3f} nats/char in {r['time_s']:.0f}s")
            (a.out / "char_lm.json").write_text(json.dumps(res, indent=1))
    plot(res, a.plots)
    log(f"wrote {a.out / 'char_lm.json'} and {a.plots / 'char_lm.png'}")


def plot(res, folder):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, _, _) in enumerate(CONFIGS):
        for j, r in enumerate(x for x in res["runs"] if x["label"] == label):
            s, v = zip(*r["val_curve"])
            ax.plot(s, v, color=f"C{i}", label=label if j == 0 else None, alpha=1 if j == 0 else 0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/char)")
    m = res["meta"]
    ax.set_title(f"char-level transformer (d={m['d']}, {m['layers']} layers, ctx {m['ctx']}) on stdlib source",
                 fontsize=9)
    ax.set_ylim(top=min(5.0, ax.get_ylim()[1]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "char_lm.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
