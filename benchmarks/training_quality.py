"""Training quality: nerofy against the paper's Nero on the plain model and against AdamW.

Benchmarks (``--bench``; data and models in benchmarks/tq_models.py):
  mlp{D}x{W}  plain ReLU MLP, D linear layers of width W (mlp20x64, mlp20x128, mlp50x64, mlp50x128) on
              scikit-learn's digits (64 features /16, standardised; 1400 train / 397 test, stratified,
              random_state=0). 30 epochs of batch 50. Metric: final test accuracy.
  charlm      char_lm.py's CharLM (d 128, 3 layers, 4 heads, ctx 64) on stdlib source (ASCII, vocab 128),
              batch 16, 1500 steps, eval every 250. Metric: final validation loss (nats/char).
  gpt2        transformers GPT2LMHeadModel from config (vocab 256, n_positions 64, n_embd 96, 2 layers,
              4 heads, no dropout, wte tied to lm_head) on the same source as raw bytes (90/10 split),
              batch 16 x ctx 64, 800 steps, eval every 200. Loss: cross-entropy of the logits against
              the next byte, all 64 positions (as charlm; not the model's ``labels=`` loss, which drops
              the last position). Metric: final validation loss (nats/byte).
  bert        transformers BertForMaskedLM from config (vocab 257 = 256 bytes + [MASK] id 256, hidden 96,
              2 layers, 4 heads, intermediate 384, 64 positions, 2 token types, no dropout, pad id 0, word
              embeddings tied to the MLM decoder) as a masked LM on gpt2's bytes and crops, batch 16 x ctx 64,
              800 steps, eval every 200. Each crop gets round(15% x 64) = 10 positions chosen at random; of
              those, each becomes [MASK] with p 0.8, a uniform random byte with p 0.1, or stays (BERT's
              recipe), drawn from torch.Generator().manual_seed(1_000_000 * seed + step) for training step
              1, 2, ...; the validation batches are masked the same way with seed 7 (manual_seed(7_000_000 +
              i) for batch i: the same for every config and seed). Input: the masked ids only (token types
              and attention mask left at their defaults). Loss: cross-entropy of the logits against the
              original bytes at the chosen positions only (the mean over the batch's 160). Metric: final
              validation masked-position loss (nats/byte; chance log 256).
  vit_tiny    timm vit_tiny_patch16_224 (img_size 16, patch_size 2, depth 6, 1 channel) on the digits
              upsampled bilinearly to 16x16, batch 50, 16 epochs. Metric: final test accuracy.
  resnet18    timm resnet18 (1 channel) on the same images, batch 50, 8 epochs. Metric: final test accuracy.
  mobilenetv2 timm mobilenetv2_100 (1 channel; 23 weighted layers in series) on the same images, batch 50,
              8 epochs. Metric: final test accuracy.
Classification: full batches only, a fresh permutation per epoch from a generator seeded by the seed.
Language models: random crops from char_lm.batches (seed 100 + seed); validation on 8 fixed held-out
batches (char_lm.batches(val, 8, 16, 64, 7)); bert masks both as above.

Configurations (``--configs``; each gets the plain model built right after torch.manual_seed(seed)):
  nerofy                 nerofy.wrap(model, lr=0.01)   (library defaults)
  nerofy projected       ... update="projected"
  nerofy paper-update    ... update="paper"
  nerofy no clip         ... clip=None: Nero's steps uncapped, as in the paper (the default caps each
                         neuron's step at 2 lr: ||g|| / sqrt(v_hat) at most 2)
  nerofy clip 1 / 2 / 3  ... clip=1 / 2 / 3: the cap at 1, 2 (the default) or 3 lr
  nerofy clip 1.5        ... clip=1.5
  nerofy clip 0.5        ... clip=0.5
  nerofy previous defaults  ... chain_ref=None, clip_v=False: the defaults of 2026-12-03 to 12-07 (the cap
                         at 2 lr on every network, the running average of the whole gradient)
  nerofy no chain factor ... chain_ref=None: the cap at 2 lr whatever the number of layers in series
  nerofy whole-gradient v  ... clip_v=False: Nero's running average takes the whole gradient (the paper's),
                         not the gradient clipped at the cap
  nerofy clip 1 neurons  experiment: clip 1 for per-neuron tensors, none for elementwise ones (biases, gains)
  nerofy clip 1 neurons 3 elements   ... and clip 3 for elementwise ones
  nerofy beta 0.99       ... beta=0.99: a faster running average (the paper's is 0.999)
  nerofy lr 0.005        ... lr=0.005
  nerofy lr 0.02         ... lr=0.02
  nerofy lr 0.02 previous defaults  ... lr=0.02, chain_ref=None, clip_v=False
  nerofy spike C B       experiment (C 2 or 1.5, B 0.9 or 0.99): before Nero's step, each neuron's gradient
                         is shortened to at most C times the rms of its recent norms (an EMA with beta B of
                         the shortened norms^2; ZClip-style spike clipping per neuron), Nero's clip 2 behind it
  nerofy unit-gain       ... scale="unit"
  nerofy signal-gain     ... scale="signal"
  nerofy tables free     nerofy.plan, then every "embedding"/"additive" entry overridden balanced=False
  nerofy tables balanced ... balanced=True         (both only on benches that have such tables)
  nerofy gpt2 gelu-gain  gpt2 only, an experiment: mlp.c_proj gets the tanh-GELU gain (1/rms) that the plan
                         cannot find (HF writes gelu_new from elementary ops), times its residual-stream factor
  nerofy paper step-scale  ablation: ... min_scale=0: gains step at the paper's scale (initial mean
                         magnitude, 0.01 where zero) instead of at least lr (wrap's default)
  nerofy branch gain 1   ablation: residual branches without the residual-stream factor (their signal gain
                         only; the library's default before that rule)
  paper Nero             pytorch_optimizer.Nero(model.parameters(), lr=0.01) on the plain model. Its
                         default constraints=True: every dim>1 tensor is centred and normalised per
                         neuron along axis 0 (the paper's convention; for transformers' GPT-2 Conv1D,
                         whose weight is (in, out), that axis is the input one) -- lazily, at the first
                         step, before that step's update, so the first forward sees the unprojected init.
                         Its per-tensor step scale is the mean neuron norm right after that projection
                         (1 for constrained tensors). 1-d tensors are updated unconstrained.
  nerofy.Nero dim0       nerofy.Nero(model.parameters(), lr=0.01) on the plain model (layout "auto":
                         the same axis-0 convention), opt.project_() once before training.
  AdamW default          torch.optim.AdamW(lr=1e-3), torch's weight_decay 0.01
  AdamW 3e-3             AdamW lr 3e-3
  AdamW 3e-4             AdamW lr 3e-4 (with 1e-3 and 3e-3: AdamW tuned over three rates)
  Adam 1e-3              torch.optim.Adam(lr=1e-3)   (MLP benches only)
A config whose builder (or training) raises is recorded as an "error" row with the message; the sweep goes on.

Schedules (``--schedules``): const, and cosine = LambdaLR stepped every optimizer step, factor s/w over
the first w = 5% of steps (s = steps taken, so the very first step runs at 0), then
0.5 (1 + cos(pi (s - w) / (total - w))), which reaches 0 after the last step.

Results: one JSON line per finished run appended (flush + fsync) to benchmarks/results/training_quality.jsonl
(``--out``). Resumable: runs already there with status ok/diverged are skipped (the key is bench, config,
schedule, seed and the step budget, so an ``--epochs``/``--steps`` override never counts as done for the
default one). A NaN/inf training loss or evaluation ends the run as "diverged" (metric: the last finite
evaluation, or chance). ``--summary`` trains nothing: it prints the tables and writes them next to the
JSONL (training_quality.md).

    python benchmarks/training_quality.py                       # everything (long: see --list)
    python benchmarks/training_quality.py --bench mlp20x64 charlm --configs nerofy "paper Nero"
    python benchmarks/training_quality.py --list                # planned runs, which are done
    python benchmarks/training_quality.py --summary             # tables from the JSONL
    python benchmarks/training_quality.py --quick               # smoke run (training_quality_quick.jsonl)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
import nerofy  # noqa: E402
import tq_models as M  # noqa: E402
from char_lm import batches, load_text  # noqa: E402

logging.getLogger("nerofy").setLevel(logging.ERROR)

RESULTS = HERE / "results"


# ---- benchmarks ----------------------------------------------------------------------------------
@dataclass
class Bench:
    build: Callable[[], torch.nn.Module]
    data: str                 # key into DATA
    epochs: int = 0           # classification: epochs of `batch`; language models: 0
    steps: int = 0            # language models: optimizer steps
    eval_every: int = 0       # language models (classification evaluates every epoch)
    batch: int = 50
    seeds: int = 3
    tables: bool = False      # has embedding/additive tables (else the "tables" configs are skipped)
    task: str = "clm"         # language models: "clm" next-byte/char targets, "mlm" masked (bert)
    chatty: bool = True       # a progress line per evaluation

    @property
    def lm(self) -> bool:
        return self.steps > 0


BENCHES = {f"mlp{d}x{w}": Bench(lambda d=d, w=w: M.mlp(d, w), "digits", epochs=30, seeds=10, chatty=False)
           for d in (20, 50) for w in (64, 128)}
BENCHES.update(
    charlm=Bench(M.charlm, "chars", steps=1500, eval_every=250, batch=16, tables=True),
    gpt2=Bench(M.gpt2, "bytes", steps=800, eval_every=200, batch=16, tables=True),
    bert=Bench(M.bert, "bytes", steps=800, eval_every=200, batch=16, tables=True, task="mlm"),
    vit_tiny=Bench(M.vit_tiny, "images", epochs=16, tables=True),
    resnet18=Bench(M.resnet18, "images", epochs=8),
    mobilenetv2=Bench(M.mobilenetv2, "images", epochs=8),
)
CTX, VAL_BATCHES = 64, 8
MLM_RATE, IGNORE = 0.15, -100  # IGNORE: F.cross_entropy's default ignore_index (no clm target is negative)


def mlm_mask(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a (batch, ctx) crop of bytes: round(MLM_RATE * ctx) positions per row, each
    [MASK] (p 0.8), a random byte (p 0.1) or kept (p 0.1). Returns (input ids, targets): the original
    byte at the chosen positions, IGNORE elsewhere. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    b, t = x.shape
    chosen = torch.zeros(b, t, dtype=torch.bool)
    chosen.scatter_(1, torch.rand(b, t, generator=g).argsort(1)[:, :round(MLM_RATE * t)], True)
    r = torch.rand(b, t, generator=g)
    rand = torch.randint(0, 256, (b, t), generator=g)
    inp = torch.where(chosen & (r < 0.8), M.MASK_ID, torch.where(chosen & (r < 0.9), rand, x))
    return inp, torch.where(chosen, x, IGNORE)


def mlm_seed(seed: int, step: int) -> int:  # distinct for every (seed, step < 1e6)
    return 1_000_000 * seed + step


def load_chars():
    tr, va, _ = load_text()
    return tr, va, 128


def load_bytes():
    tr, va, _ = M.load_bytes()
    return tr, va, 256


DATA = {"digits": M.digits, "images": M.digits_images, "chars": load_chars, "bytes": load_bytes}
_cache: dict = {}


def data_for(bench: Bench):
    if bench.data not in _cache:
        _cache[bench.data] = DATA[bench.data]()
    return _cache[bench.data]


# ---- configurations: (plain model, example_inputs) -> (model, optimizer) -------------------------
def _wrap(**kw):
    return lambda model, ex: nerofy.wrap(model, lr=0.01, example_inputs=ex, **kw)


def _clip_by_layout(neurons, elements):
    """An experiment: one cap for neurons (vectors), another for elementwise tensors (biases, gains)."""
    from nerofy.layout import ELEMENTWISE

    def build(model, ex):
        model, opt = nerofy.wrap(model, lr=0.01, example_inputs=ex)
        for g in opt.param_groups:
            g["clip"] = elements if g["layout"] == ELEMENTWISE else neurons
        return model, opt
    return build


class _SpikeClip(torch.optim.Optimizer):
    """An experiment: before Nero sees them, shorten gradients whose per-neuron norm is over ``c``
    times the rms of that neuron's recent norms (EMA ``beta``; the clipped norm enters the EMA)."""

    def __init__(self, opt, c, beta):
        self.opt, self.c, self.beta, self.ema = opt, c, beta, {}
        self.param_groups, self.state, self.defaults = opt.param_groups, opt.state, opt.defaults

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.opt.param_groups:
            lay = group["layout"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                gv, dims = lay.neuron_view(p.grad)
                n2 = gv.float().square().sum(dims, keepdim=True) if dims else gv.float().square()
                e = self.ema.get(p)
                if e is None:
                    self.ema[p] = n2.clone()
                    continue
                f = (self.c * self.c * e / n2.clamp_min(1e-30)).sqrt().clamp(max=1.0)
                gv.mul_(f.to(gv.dtype))
                e.mul_(self.beta).add_(n2 * f.square(), alpha=1 - self.beta)
        return self.opt.step(closure)


def _spike(c, beta, **kw):
    def build(model, ex):
        model, opt = nerofy.wrap(model, lr=0.01, example_inputs=ex, **kw)
        return model, _SpikeClip(opt, c, beta)
    return build


def _tables(balanced: bool):
    def build(model, ex):
        plan = nerofy.plan(model, ex)
        names = [e.name for e in plan if e.role in ("embedding", "additive")]
        if not names:
            raise ValueError("the plan has no embedding/additive entries")
        for n in names:
            plan.override(n, balanced=balanced)
        return nerofy.wrap(model, plan=plan, lr=0.01)
    return build


def _zero_bias(model, ex):
    """Experiment: every bias starts at 0 (PyTorch's U(+-1/sqrt(fan_in)) init dominates a deep
    centred ReLU net's signal from ~15 layers on, so the output hardly depends on the input)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.zero_()
    return _wrap()(model, ex)


def _gpt2_gelu_gain(model, ex):
    """An experiment, not a rule: HF GPT-2's gelu_new is built from elementary ops, so the plan
    finds no activation feeding mlp.c_proj; give it the gain its tanh-GELU would get."""
    from nerofy import gains
    plan = nerofy.plan(model, ex)
    for e in plan:
        if e.name.endswith("mlp.c_proj.weight"):  # keeps the residual-stream factor the plan gives it
            plan.override(e.name, gain=gains.gain(("gelu", (("approximate", "tanh"),))) * (e.stream_rms or 1.0))
    return nerofy.wrap(model, plan=plan, lr=0.01)


def _branch_gain_1(model, ex):
    """Ablation: residual branches at their signal gain alone (no residual-stream factor)."""
    plan = nerofy.plan(model, ex)
    branches = [e for e in plan if e.stream_rms is not None]
    if not branches:
        raise ValueError("the plan has no residual branches on a stream of table rows")
    for e in branches:
        plan.override(e.name, gain=e.signal_gain() / e.stream_rms)
    return nerofy.wrap(model, plan=plan, lr=0.01)


def _paper_nero(model, ex):
    from pytorch_optimizer import Nero
    return model, Nero(model.parameters(), lr=0.01)


def _nerofy_nero(model, ex):
    opt = nerofy.Nero(model.parameters(), lr=0.01)
    with torch.no_grad():
        opt.project_()  # start on the balanced set, as wrap does
    return model, opt


def _torch(cls, lr):
    return lambda model, ex: (model, cls(model.parameters(), lr=lr))


CONFIGS = {
    "nerofy": _wrap(),
    "nerofy projected": _wrap(update="projected"),
    "nerofy paper-update": _wrap(update="paper"),
    "nerofy no clip": _wrap(clip=None),
    "nerofy clip 1": _wrap(clip=1.0),
    "nerofy clip 2": _wrap(clip=2.0),
    "nerofy clip 3": _wrap(clip=3.0),
    "nerofy clip 1.5": _wrap(clip=1.5),
    "nerofy clip 0.5": _wrap(clip=0.5),
    "nerofy previous defaults": _wrap(chain_ref=None, clip_v=False),
    "nerofy no chain factor": _wrap(chain_ref=None),
    "nerofy whole-gradient v": _wrap(clip_v=False),
    "nerofy clip 1 neurons": _clip_by_layout(1.0, None),
    "nerofy clip 1 neurons 3 elements": _clip_by_layout(1.0, 3.0),
    "nerofy beta 0.99": _wrap(beta=0.99),
    "nerofy spike 2 0.9": _spike(2.0, 0.9),
    "nerofy spike 1.5 0.9": _spike(1.5, 0.9),
    "nerofy spike 2 0.99": _spike(2.0, 0.99),
    "nerofy lr 0.005": lambda model, ex: nerofy.wrap(model, lr=0.005, example_inputs=ex),
    "nerofy lr 0.02": lambda model, ex: nerofy.wrap(model, lr=0.02, example_inputs=ex),
    "nerofy lr 0.02 previous defaults": lambda model, ex: nerofy.wrap(model, lr=0.02, example_inputs=ex, chain_ref=None,
                                                                      clip_v=False),
    "nerofy zero bias": _zero_bias,
    "nerofy unit-gain": _wrap(scale="unit"),
    "nerofy signal-gain": _wrap(scale="signal"),
    "nerofy tables free": _tables(False),
    "nerofy tables balanced": _tables(True),
    "nerofy gpt2 gelu-gain": _gpt2_gelu_gain,
    "nerofy branch gain 1": _branch_gain_1,
    "nerofy paper step-scale": _wrap(min_scale=0.0),  # gains at the paper's step scale
    "paper Nero": _paper_nero,
    "nerofy.Nero dim0": _nerofy_nero,
    "AdamW default": _torch(torch.optim.AdamW, 1e-3),
    "AdamW 3e-3": _torch(torch.optim.AdamW, 3e-3),
    "AdamW 3e-4": _torch(torch.optim.AdamW, 3e-4),
    "Adam 1e-3": _torch(torch.optim.Adam, 1e-3),
}
BASELINE = "paper Nero"


def applies(bench: str, config: str) -> bool:
    if config == "nerofy branch gain 1":  # pre-norm streams that start as table rows (BERT is post-norm)
        return bench in ("charlm", "gpt2")
    if config.startswith("nerofy tables"):
        return BENCHES[bench].tables
    if config == "nerofy gpt2 gelu-gain":
        return bench == "gpt2"
    if config == "Adam 1e-3":
        return bench.startswith("mlp")
    return True


def cosine(total: int, warm: float = 0.05):
    w = max(1, round(warm * total))

    def factor(s):  # s = optimizer steps taken so far; the next step runs at lr * factor(s)
        return s / w if s < w else 0.5 * (1.0 + math.cos(math.pi * (s - w) / max(1, total - w)))
    return factor


# ---- one run -------------------------------------------------------------------------------------
def budget(bench: Bench, a) -> tuple[int, int]:
    """(total optimizer steps, steps between evaluations)."""
    if bench.lm:
        steps = a.steps or bench.steps
        return steps, min(steps, a.eval_every or bench.eval_every)
    n = len(data_for(bench)[0]) // bench.batch
    return (a.epochs or bench.epochs) * n, n


def train_batches(bench: Bench, total: int, seed: int):
    d = data_for(bench)
    if bench.lm:
        crops = batches(d[0], total, bench.batch, CTX, 100 + seed)
        if bench.task == "mlm":  # the same crops, masked; the next-byte targets are unused
            crops = (mlm_mask(x, mlm_seed(seed, step)) for step, (x, _) in enumerate(crops, 1))
        yield from crops
        return
    X, y = d[0], d[1]
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(X) // bench.batch  # full batches only: a ragged tail would be a tiny, noisy step
    while True:
        perm = torch.randperm(len(X), generator=g)
        for i in range(per_epoch):
            idx = perm[i * bench.batch:(i + 1) * bench.batch]
            yield X[idx], y[idx]


def logits(model, x):
    out = model(x)
    return getattr(out, "logits", out)  # Hugging Face models return a ModelOutput


def loss_fn(model, x, y):
    z = logits(model, x)  # mlm: the mean over the targets that are not IGNORE
    return F.cross_entropy(z.flatten(0, -2), y.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model, bench: Bench, val) -> float:
    model.eval()
    try:
        if bench.lm:
            return sum(float(loss_fn(model, x, y)) for x, y in val) / len(val)
        X, y = val
        hits = sum(int((logits(model, X[i:i + 256]).argmax(-1) == y[i:i + 256]).sum()) for i in range(0, len(X), 256))
        return hits / len(X)
    finally:
        model.train()


def run_one(name: str, config: str, schedule: str, seed: int, a, log) -> dict:
    bench = BENCHES[name]
    d = data_for(bench)
    total, every = budget(bench, a)
    if bench.lm:
        val, chance, higher = list(batches(d[1], VAL_BATCHES, bench.batch, CTX, 7)), math.log(d[2]), False
        if bench.task == "mlm":  # a fixed masking: the same for every config and seed
            val = [mlm_mask(x, mlm_seed(7, i)) for i, (x, _) in enumerate(val)]
        ex = (d[0][:CTX].unsqueeze(0),)
    else:
        val, chance, higher = (d[2], d[3]), 0.1, True
        ex = (d[0][:2],)
    row = {"bench": name, "config": config, "schedule": schedule, "seed": seed,
           "metric": "val_loss" if bench.lm else "test_acc", "value": None, "best": None, "curve": [],
           "train_loss": [], "steps": total, "eval_every": every, "batch": bench.batch, "time_s": None,
           "build_s": None, "status": "error", "error": None}
    t0 = time.perf_counter()
    phase = "build"
    try:
        torch.manual_seed(seed)
        model = bench.build()
        row["params"] = sum(p.numel() for p in model.parameters())
        model, opt = CONFIGS[config](model, ex)
        row["build_s"] = round(time.perf_counter() - t0, 3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(total)) if schedule == "cosine" else None
        torch.manual_seed(seed)  # the same RNG stream in training for every config (however it was built)
        phase = "train"
        row["curve"].append([0, evaluate(model, bench, val)])
        losses, status = [], "ok"
        for step, (x, y) in enumerate(train_batches(bench, total, seed), 1):
            loss = loss_fn(model, x, y)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                status = "diverged"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if step % every == 0 or step == total:
                v = evaluate(model, bench, val)
                row["curve"].append([step, v if math.isfinite(v) else None])  # None: strict JSON
                row["train_loss"].append(statistics.fmean(losses[-every:]))
                if not math.isfinite(v):
                    status = "diverged"
                    break
                if bench.chatty:
                    log(f"  {name} {config} {schedule} {seed} step {step}/{total}: train {row['train_loss'][-1]:.3f}"
                        f"  {row['metric']} {v:.4f}")
            if step == total:
                break
        finite = [v for _, v in row["curve"][1:] if v is not None]
        row["value"] = finite[-1] if finite else chance
        row["best"] = (max if higher else min)(finite) if finite else chance
        row["status"] = status
    except Exception as e:  # a config the library does not support (yet), or a failure in training
        row["error"] = f"{phase}: {type(e).__name__}: {e}"[:2000]
        row["traceback"] = traceback.format_exc(limit=-4)[-3000:]
    row["time_s"] = round(time.perf_counter() - t0, 3)
    return row


# ---- results file --------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: that run simply runs again
            pass
    return rows


def key(r) -> tuple:
    return r["bench"], r["config"], r["schedule"], r["seed"], r["steps"]


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def meta(a) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    # the library may be edited between commits: a hash of its sources tells such runs apart
    src = hashlib.sha1()
    for p in sorted((ROOT / "nerofy").glob("*.py")):
        src.update(p.name.encode() + p.read_bytes())
    return {"torch": torch.__version__, "nerofy": nerofy.__version__, "python": platform.python_version(),
            "threads": a.threads, "git_commit": commit, "nerofy_src": src.hexdigest()[:12], "quick": a.quick}


def planned(a) -> list[tuple[str, str, str, int]]:
    """(bench, config, schedule, seed) in run order."""
    seeds = {b: a.seeds if a.seeds is not None else ([0] if a.quick else list(range(BENCHES[b].seeds)))
             for b in a.bench}
    cells = [(b, c, s) for b in a.bench for s in a.schedules for c in a.configs if applies(b, c)]
    runs = [(b, c, s, seed) for b, c, s in cells for seed in seeds[b]]
    if a.order == "seed-major":  # every config of a seed before the next seed: partial results stay paired
        runs.sort(key=lambda r: r[3])  # stable: bench, schedule, config order within a seed
    elif a.order == "bench-major":
        runs.sort(key=lambda r: (a.bench.index(r[0]), r[3]))
    return runs


# ---- summary -------------------------------------------------------------------------------------
def _ms(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summary(rows: list[dict]) -> str:
    done, errors = {}, {}
    for r in rows:  # the last finished row of a run wins; errors count only for runs never finished
        k = key(r)
        if r["status"] in ("ok", "diverged"):
            done[k] = r
        else:
            errors.setdefault(k, r)
    errors = {k: r for k, r in errors.items() if k not in done}
    out = []
    benches = list(dict.fromkeys((k[0], k[4]) for k in list(done) + list(errors)))
    for b, steps in benches:
        mine = {k: r for k, r in done.items() if (k[0], k[4]) == (b, steps)}
        errs = {k: r for k, r in errors.items() if (k[0], k[4]) == (b, steps)}
        metric = next(iter(mine.values()))["metric"] if mine else "?"
        higher = metric == "test_acc"
        out += [f"## {b} ({steps} steps; {metric}, {'higher' if higher else 'lower'} is better)", "",
                f"| config | schedule | n | mean ± std | worst | Δ vs {BASELINE} (paired) | diverged | errors |",
                "|---|---|---|---|---|---|---|---|"]
        cells = list(dict.fromkeys((k[1], k[2]) for k in list(mine) + list(errs)))
        cells.sort(key=lambda c: (list(CONFIGS).index(c[0]) if c[0] in CONFIGS else 99, c[1]))
        notes = []
        for c, s in cells:
            rs = {k[3]: r for k, r in mine.items() if k[1:3] == (c, s)}
            ne = sum(1 for k in errs if k[1:3] == (c, s))
            if ne:
                msg = next(r["error"] for k, r in errs.items() if k[1:3] == (c, s))
                notes.append(f"- {c} / {s}: {msg.splitlines()[0][:300]}")
            if not rs:
                out.append(f"| {c} | {s} | 0 | | | | | {ne} |")
                continue
            vals = [r["value"] for r in rs.values()]
            m, sd = _ms(vals)
            worst = min(vals) if higher else max(vals)
            base = {k[3]: r["value"] for k, r in mine.items() if k[1:3] == (BASELINE, s)}
            diffs = [r["value"] - base[seed] for seed, r in rs.items() if seed in base]
            delta = "" if c == BASELINE or not diffs else "{:+.4f} ± {:.4f} (n={})".format(*_ms(diffs), len(diffs))
            div = sum(r["status"] == "diverged" for r in rs.values())
            out.append(f"| {c} | {s} | {len(vals)} | {m:.4f} ± {sd:.4f} | {worst:.4f} | {delta} | {div or ''} | "
                       f"{ne or ''} |")
        if notes:
            out += ["", "Errors (first message per cell):", *notes]
        out.append("")
    return "\n".join(out) if out else "(no results)"


# ---- main ----------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="LABEL")
    ap.add_argument("--schedules", nargs="+", default=["const", "cosine"], choices=["const", "cosine"])
    ap.add_argument("--seeds", type=int, nargs="+", help="default: 0..9 for the mlp benches, 0..2 for the others")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, help="language-model benches: optimizer steps")
    ap.add_argument("--epochs", type=int, help="classification benches: epochs")
    ap.add_argument("--eval-every", type=int, help="language-model benches: steps between evaluations")
    ap.add_argument("--order", default="seed-major", choices=["seed-major", "bench-major", "config-major"],
                    help="seed-major: for each seed every bench/config; bench-major: one bench at a time, seed "
                         "by seed; config-major: all seeds of a config before the next")
    ap.add_argument("--quick", action="store_true", help="2 epochs / 20 steps, seed 0, to training_quality_quick.jsonl")
    ap.add_argument("--out", type=Path, help="JSONL (default benchmarks/results/training_quality[_quick].jsonl)")
    ap.add_argument("--summary", action="store_true", help="no training: tables from the JSONL, also written as .md")
    ap.add_argument("--list", action="store_true", help="no training: the planned runs and which are done")
    a = ap.parse_args(argv)
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    if a.quick:
        a.epochs, a.steps, a.eval_every = a.epochs or 2, a.steps or 20, a.eval_every or 10
    a.out = a.out or RESULTS / ("training_quality_quick.jsonl" if a.quick else "training_quality.jsonl")

    if a.summary:
        text = summary(read_rows(a.out))
        print(text)
        md = a.out.with_suffix(".md")
        md.write_text(f"# Training quality ({a.out.name})\n\n{text}\n")
        print(f"wrote {md}")
        return

    torch.set_num_threads(a.threads)
    runs = planned(a)
    rows = read_rows(a.out)
    finished = {key(r) for r in rows if r["status"] in ("ok", "diverged")}
    steps = {b: budget(BENCHES[b], a)[0] for b in a.bench}
    todo = [r for r in runs if (*r, steps[r[0]]) not in finished]
    if a.list:
        cells: dict = {}
        for r in runs:
            c = cells.setdefault(r[:3], [[], []])
            c[(*r, steps[r[0]]) in finished].append(r[3])
        for (b, c, s), (left, done) in cells.items():
            print(f"{b:10s} {c:24s} {s:6s} {steps[b]:5d} steps  done {len(done):2d}  todo seeds {left or '-'}")
        print(f"{len(runs)} runs planned, {len(runs) - len(todo)} done, {len(todo)} to do ({a.out})")
        return

    a.out.parent.mkdir(parents=True, exist_ok=True)
    info = meta(a)
    T0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)

    log(f"{len(todo)} of {len(runs)} runs to do -> {a.out} (torch {info['torch']}, nerofy {info['nerofy']} "
        f"src {info['nerofy_src']}, commit {info['git_commit']}, {a.threads} thread(s))")
    for b, c, s, seed in todo:
        row = {**run_one(b, c, s, seed, a, log), **info}
        append(a.out, row)
        if row["status"] == "error":
            log(f"{b} {c} {s} {seed}: ERROR {row['error'].splitlines()[0][:200]} ({row['time_s']:.1f}s)")
        else:
            div = " DIVERGED" if row["status"] == "diverged" else ""
            log(f"{b} {c} {s} {seed}: {row['metric']} {row['value']:.4f} best {row['best']:.4f}{div} "
                f"({row['time_s']:.1f}s)")
    log(f"done; python {Path(__file__).relative_to(ROOT)} --summary{' --quick' if a.quick else ''} for the tables")


if __name__ == "__main__":
    main()
