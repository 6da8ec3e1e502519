"""Optimizer step time and state size on timm resnet50 (CPU), side by side in one run.

Compares nerofy's Nero (fused kernel and foreach path) with torch SGD (momentum), Adam and AdamW
(foreach and fused) and pytorch_optimizer's Nero. Every optimizer gets its own copy of the
parameters and the same fixed gradients (randn * 1e-3); the optimizers take turns step by step
(the order rotates every round) so that noise on a shared machine hits them alike, and ratios are
medians of per-round ratios. State size is the bytes of every tensor in ``optimizer.state``.

    python benchmarks/optimizer_step.py                 # 1 thread and all threads
    python benchmarks/optimizer_step.py --threads 1 --steps 30
    python benchmarks/optimizer_step.py --quick         # a smoke run
    python benchmarks/optimizer_step.py --torch-compile # also a torch.compile'd Nero update

Writes benchmarks/results/optimizer_step.md and .json (``--out`` to change the folder).

GPU suite (``--device cuda``; see :func:`run_suite`): nerofy Nero on its Triton route (the default
``fused=None``), foreach (``fused=False``) and ``capturable=True`` (also replayed as a CUDA graph)
against torch AdamW (fused, foreach, fused+capturable as a CUDA graph) and pytorch_optimizer's Nero,
on the tensor lists of timm resnet50, vit_base_patch16_224 and a ~1.1B-parameter Llama-style decoder
(TinyLlama's shapes, built on the meta device; layouts and least step scales from nerofy.wrap of the
same models, the decoder's from a one-layer copy), plus a training step (forward + backward + step)
on resnet50 and vit_base: nerofy.wrap + Nero (Triton, foreach) against the plain model + AdamW fused.
Per optimizer: step time from CUDA events (median; ratios vs AdamW fused are medians of per-round
ratios), back-to-back ms/step, host time to enqueue a step, peak memory over the parameters
(``max_memory_allocated`` after a reset, state creation included), state bytes, CUDA kernels per
step (torch.profiler), Triton launches per step, torch ops dispatched per step, host reads of a
device value (``aten._local_scalar_dense``) and synchronising calls (``set_sync_debug_mode("warn")``).

    python benchmarks/optimizer_step.py --device cuda                      # fp32, all three models
    python benchmarks/optimizer_step.py --device cuda --dtype bfloat16     # bf16 params, fp32 Nero state
    python benchmarks/optimizer_step.py --device cuda --quick              # tiny models, a functional check
    python benchmarks/optimizer_step.py --device cpu --gpu-suite --quick   # the same code on CPU tensors

Writes optimizer_step_cuda.md / .json (``_bfloat16`` appended for bf16; ``_quick`` for --quick; the
CPU run of the suite writes optimizer_step_suite_cpu*), never the CPU files above. On CPU the suite
sends the Triton rows through triton's interpreter (``TRITON_INTERPRET=1``, set here before triton is
imported, and ``nerofy._triton.ON_CPU``): slow, only for the tiny models; CUDA events, graphs, the
CUDA profiler activity and the sync debug mode are skipped there with a note.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BASE = "torch Adam (fused)"
PO_NERO = "pytorch_optimizer Nero"
OURS = "nerofy Nero (fused)"


def state_bytes(opt) -> int:
    def walk(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0
    return sum(walk(st) for st in opt.state.values())


class CompiledNero:
    """Nero's update with torch.compile (per tensor, dynamic shapes): the other fused route we tried."""

    def __init__(self, params, lr=0.01, beta=0.999, eps=1e-16):
        self.params, self.lr, self.beta, self.eps = list(params), lr, beta, eps
        self.state = {}
        self.compile_s = None

        def rows(w, g, v, c_lr, bc, beta: float):
            sq = (g * g).sum(1, keepdim=True)
            v.mul_(beta).add_((1 - beta) * sq)
            x = w - (c_lr / (v * bc).sqrt().clamp_min(eps)) * g
            x = x - x.mean(1, keepdim=True)
            w.copy_(x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12))

        def elems(w, g, v, c_lr, bc, beta: float):
            v.mul_(beta).add_((1 - beta) * g * g)
            w.sub_(c_lr * g / (v * bc).sqrt().clamp_min(eps))

        import torch._dynamo

        # one graph per distinct shape class; the default limit (8) would drop to eager mid-model
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        self._rows = torch.compile(rows, dynamic=True)
        self._elems = torch.compile(elems, dynamic=True)

    @torch.no_grad()
    def step(self):
        t0 = time.perf_counter() if self.compile_s is None else None
        for p in self.params:
            st = self.state.get(p)
            if st is None:
                st = self.state[p] = {"step": 0, "v": torch.zeros(p.shape[0], 1) if p.dim() > 1 else torch.zeros_like(p),
                                      "scale": 1.0 if p.dim() > 1 else max(float(p.abs().mean()), 0.01)}
            st["step"] += 1
            bc = torch.tensor(1.0 / (1.0 - self.beta ** st["step"]))
            c_lr = torch.tensor(self.lr * st["scale"])
            if p.dim() > 1:
                self._rows(p.view(p.shape[0], -1), p.grad.view(p.shape[0], -1), st["v"], c_lr, bc, self.beta)
            else:
                self._elems(p, p.grad, st["v"], c_lr, bc, self.beta)
        if t0 is not None:
            self.compile_s = time.perf_counter() - t0


def make_optimizers(model_params, grads, with_compile: bool):
    from pytorch_optimizer import Nero as PONero

    from nerofy.optim import Nero

    specs = [
        (OURS, lambda ps: Nero(ps, lr=0.01, fused=True)),
        ("nerofy Nero (foreach)", lambda ps: Nero(ps, lr=0.01, fused=False)),
        ("torch SGD (momentum, foreach)", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True)),
        ("torch Adam (foreach)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
        (BASE, lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        ("torch AdamW (foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        ("torch AdamW (fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        (PO_NERO, lambda ps: PONero(ps, lr=0.01)),
    ]
    if with_compile:
        specs.append(("Nero via torch.compile (per tensor)", lambda ps: CompiledNero(ps, lr=0.01)))
    out = []
    for name, make in specs:
        ps = [torch.nn.Parameter(p.detach().clone()) for p in model_params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        out.append((name, make(ps)))
    return out


def bench(opts, steps: int, warmup: int):
    times = {name: [] for name, _ in opts}
    for _ in range(warmup):
        for _, opt in opts:
            opt.step()
    for r in range(steps):
        k = r % len(opts)
        for name, opt in opts[k:] + opts[:k]:
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(opts, times):
    base = times[BASE]
    adam_state = state_bytes(dict(opts)[BASE])
    rows = []
    for name, opt in opts:
        ts = times[name]
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        sb = state_bytes(opt)
        rows.append(dict(
            name=name,
            median_ms=1e3 * statistics.median(ts),
            p25_ms=1e3 * q[0],
            p75_ms=1e3 * q[2],
            ratio_to_adam_fused=statistics.median(a / b for a, b in zip(ts, base)),
            state_bytes=sb,
            state_ratio_to_adam=sb / adam_state if adam_state else float("nan"),
        ))
    po, ours = times[PO_NERO], times[OURS]
    ours_row = next(r for r in rows if r["name"] == OURS)
    targets = {
        "step <= Adam fused": ours_row["ratio_to_adam_fused"] <= 1.0,
        ">= 3x faster than pytorch_optimizer Nero": statistics.median(p / o for p, o in zip(po, ours)) >= 3.0,
        "state <= 0.2% of Adam": ours_row["state_ratio_to_adam"] <= 0.002,
    }
    speedup_po = statistics.median(p / o for p, o in zip(po, ours))
    return rows, targets, speedup_po


def fmt_table(rows) -> str:
    lines = ["| optimizer | step ms (median) | p25-p75 ms | vs Adam fused | state MB | state vs Adam |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['median_ms']:.2f} | {r['p25_ms']:.1f}-{r['p75_ms']:.1f} | "
                     f"{r['ratio_to_adam_fused']:.2f}x | {r['state_bytes'] / 2**20:.3f} | "
                     f"{100 * r['state_ratio_to_adam']:.3f}% |")
    return "\n".join(lines)


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_overheads() -> dict:
    """Cold build time of the fused kernel and the per-step cost of a tiny model (fixed overhead)."""
    from nerofy import _fused
    from nerofy.optim import Nero

    out = {"available": _fused.available(), "reason": _fused.unavailable_reason(), **_fused.build_info()}
    if not out["available"]:
        return out
    old = os.environ.get("NEROFY_CACHE_DIR")
    with tempfile.TemporaryDirectory() as d:
        os.environ["NEROFY_CACHE_DIR"] = d
        try:
            t0 = time.perf_counter()
            lib, why, info = _fused._build()
            out["cold_build_s"] = time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("NEROFY_CACHE_DIR", None)
            else:
                os.environ["NEROFY_CACHE_DIR"] = old
    for fused in (True, False):
        p = torch.nn.Parameter(torch.randn(8, 8))
        p.grad = torch.randn(8, 8)
        opt = Nero([p], fused=fused)
        for _ in range(20):
            opt.step()
        ts = []
        for _ in range(200):
            t0 = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t0)
        out[f"tiny_step_us_{'fused' if fused else 'foreach'}"] = 1e6 * statistics.median(ts)
    return out


# =============================================================================================
# the GPU suite (--device cuda; --device cpu --gpu-suite runs the same code on CPU tensors)
# =============================================================================================
S_BASE = "torch AdamW (fused)"
S_TRITON = "nerofy Nero (Triton)"
S_FOREACH = "nerofy Nero (foreach)"
S_CAPT = "nerofy Nero (Triton, capturable)"
S_GRAPH = "nerofy Nero (capturable, CUDA graph)"
S_ADAMW_FOREACH = "torch AdamW (foreach)"
S_ADAMW_GRAPH = "torch AdamW (fused, capturable, CUDA graph)"
S_PO = "pytorch_optimizer Nero"
TRITON_ROWS = (S_TRITON, S_CAPT, S_GRAPH)
GRAPH_ROWS = (S_GRAPH, S_ADAMW_GRAPH)

# TinyLlama-1.1B's shapes: 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000
DECODER_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000)
SUITE_MODELS = {
    "resnet50": dict(kind="timm", arch="resnet50", kw={}, input=(3, 224, 224), classes=1000),
    "vit_base": dict(kind="timm", arch="vit_base_patch16_224", kw={}, input=(3, 224, 224), classes=1000),
    "decoder_1b": dict(kind="llama", cfg=DECODER_1B),
}
QUICK_SUITE_MODELS = {
    "tiny_cnn": dict(kind="cnn", input=(3, 16, 16), classes=10),
    "tiny_vit": dict(kind="timm", arch="vit_base_patch16_224", input=(3, 32, 32), classes=10,
                     kw=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)),
    "tiny_decoder": dict(kind="llama", cfg=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=256)),
}
TRAIN_MODELS = ("resnet50", "vit_base")
QUICK_TRAIN_MODELS = ("tiny_cnn", "tiny_vit")
T_BASE = "original + AdamW (fused)"
T_TRITON = "nerofy.wrap + Nero (Triton)"
T_FOREACH = "nerofy.wrap + Nero (foreach)"


class SuiteError(RuntimeError):
    pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tiny_cnn(classes: int = 10) -> torch.nn.Module:
    """Every layout kind the timm models do not all have: rows, grouped conv, ConvTranspose columns."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                         nn.ConvTranspose2d(8, 6, 2, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))


def _create(cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if cfg["kind"] == "timm":
        import timm
        return timm.create_model(cfg["arch"], pretrained=False, **cfg["kw"])
    if cfg["kind"] == "cnn":
        return _tiny_cnn(cfg["classes"])
    raise ValueError(cfg["kind"])


def _wrapped_tensors(model: torch.nn.Module, example_inputs) -> list[dict]:
    """nerofy.wrap(model) on the CPU; per tensor its optimizer gets: name, shape, layout, least step
    scale and its (balanced) value. wrap hands Nero the model's own parameter objects, so the names
    of the plain model find them."""
    import nerofy

    names = {id(p): n for n, p in model.named_parameters()}
    _, opt = nerofy.wrap(model, example_inputs=example_inputs)
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            out.append(dict(name=names.get(id(p), f"<tensor {len(out)}>"), shape=tuple(p.shape), layout=g["layout"],
                            min_scale=g.get("min_scale"), init=p.detach().clone()))
    return out


def _decoder_tensors(cfg: dict) -> tuple[list[dict], int]:
    """A Llama-style decoder's tensor list: shapes from the model built on the meta device, layouts and
    least step scales from nerofy.wrap of a one-layer copy at tiny width (matched by name, the layer
    index ignored); values are drawn on the device later. Returns (tensors, names without a match)."""
    import re

    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    small = LlamaConfig(hidden_size=8 * heads, intermediate_size=24 * heads, num_hidden_layers=1,
                        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=64,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(small)
    ids = torch.randint(0, small.vocab_size, (2, 8))
    key = lambda n: re.sub(r"\.layers\.\d+\.", ".layers.0.", n)  # noqa: E731
    by_name = {key(t["name"]): t for t in _wrapped_tensors(tiny, {"input_ids": ids})}
    with torch.device("meta"):
        big = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    out, missing = [], 0
    for n, p in big.named_parameters():
        src = by_name.get(key(n))
        if src is None or len(src["shape"]) != p.dim():
            missing += 1
        out.append(dict(name=n, shape=tuple(p.shape), layout=src["layout"] if src else "auto",
                        min_scale=src["min_scale"] if src else None, init=None))
    return out, missing


def suite_tensors(key: str, cfg: dict) -> tuple[list[dict], dict]:
    if cfg["kind"] == "llama":
        tensors, missing = _decoder_tensors(cfg["cfg"])
        info = dict(source="transformers LlamaForCausalLM (meta device) " + json.dumps(cfg["cfg"]),
                    unmatched_layouts=missing)
    else:
        model = _create(cfg)
        tensors = _wrapped_tensors(model, (torch.randn(2, *cfg["input"]),))
        info = dict(source=f"timm {cfg['arch']} {cfg.get('kw') or ''}".strip() if cfg["kind"] == "timm" else "tiny CNN")
    info.update(tensors=len(tensors), parameters=sum(math.prod(t["shape"]) for t in tensors),
                constrained_tensors=sum(1 for t in tensors if t["layout"] != "auto" and not t["layout"].elementwise))
    return tensors, info


def _alloc(tensors: list[dict], device, dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for t in tensors:
        if t["init"] is not None:
            out.append(t["init"].to(device=device, dtype=dtype))
        else:
            out.append(torch.randn(t["shape"], generator=gen, device=device, dtype=torch.float32).to(dtype) * 0.02)
    return out


def _nero_groups(tensors: list[dict], params: list[torch.Tensor]) -> list[dict]:
    """wrap's groups again: one per (layout, least step scale), in first-seen order."""
    groups: dict = {}
    for t, p in zip(tensors, params):
        groups.setdefault((t["layout"], t["min_scale"]), []).append(p)
    return [{"params": ps, "layout": lay, **({"min_scale": ms} if ms is not None else {})}
            for (lay, ms), ps in groups.items()]


class Graphed:
    """An optimizer whose ``step()`` is captured once in a CUDA graph and replayed (after warm-up steps
    on a side stream, as torch's docs do it)."""

    def __init__(self, opt, device, warmup: int = 3):
        self.opt, self.state = opt, opt.state
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            for _ in range(warmup):
                opt.step()
        torch.cuda.current_stream(device).wait_stream(s)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            opt.step()
        torch.cuda.synchronize(device)

    def step(self):
        self.graph.replay()


def suite_specs(device: torch.device, triton_ok: bool, po_ok: bool) -> tuple[list, dict]:
    """(name, make(tensors, params) -> optimizer) for every row this device can run, and the reasons
    for the rows it skips."""
    from nerofy.optim import Nero

    cuda = device.type == "cuda"
    skipped = {}
    specs = []
    if triton_ok:
        specs.append((S_TRITON, lambda ts, ps: Nero(_nero_groups(ts, ps), lr=0.01)))
    else:
        skipped[S_TRITON] = skipped[S_CAPT] = "triton unavailable (or compiled for a GPU while the tensors are on the CPU)"
    specs.append((S_FOREACH, lambda ts, ps: Nero(_nero_groups(ts, ps), lr=0.01, fused=False)))
    if triton_ok:
        specs.append((S_CAPT, lambda ts, ps: Nero(_nero_groups(ts, ps), lr=torch.tensor(0.01, device=device),
                                                  capturable=True)))
    if cuda and triton_ok:
        specs.append((S_GRAPH, lambda ts, ps: Graphed(Nero(_nero_groups(ts, ps), lr=torch.tensor(0.01, device=device),
                                                           capturable=True), device)))
    elif not cuda:
        skipped[S_GRAPH] = "CUDA graphs need a GPU"
    specs.append((S_BASE, lambda ts, ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)))
    specs.append((S_ADAMW_FOREACH, lambda ts, ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)))
    if cuda:
        specs.append((S_ADAMW_GRAPH, lambda ts, ps: Graphed(torch.optim.AdamW(
            ps, lr=torch.tensor(1e-3, device=device), fused=True, capturable=True), device)))
    else:
        skipped[S_ADAMW_GRAPH] = "CUDA graphs need a GPU"
    if po_ok:
        from pytorch_optimizer import Nero as PONero
        specs.append((S_PO, lambda ts, ps: PONero(ps, lr=0.01)))
    else:
        skipped[S_PO] = "pytorch_optimizer is not importable (pip install -e '.[dev]')"
    return specs, skipped


class _OpCounter:
    """Counts the torch ops one or more steps dispatch (a TorchDispatchMode) and the host reads of a
    device value among them; ops triton's interpreter issues inside a launch are not the step's."""

    HOST_READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from nerofy import _triton

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not _triton._launching:
                    name = str(func.overloadpacket)
                    counter.ops[name] = counter.ops.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.ops: dict[str, int] = {}
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def host_reads(self) -> int:
        return sum(self.ops.get(k, 0) for k in self.HOST_READS)


def count_ops(opt, n: int) -> dict:
    from nerofy import _triton

    before = _triton.stats["launches"]
    with _OpCounter() as c:
        for _ in range(n):
            opt.step()
    return dict(aten_ops_per_step=sum(c.ops.values()) / n, host_reads_per_step=c.host_reads() / n,
                triton_launches_per_step=(_triton.stats["launches"] - before) / n,
                top_ops=dict(sorted(c.ops.items(), key=lambda kv: -kv[1])[:6]))


def count_cuda_kernels(opt, device, n: int) -> dict:
    """CUDA kernels (and memcpy/memset) per step from torch.profiler, and the synchronising runtime
    calls it saw (cudaStreamSynchronize, cudaDeviceSynchronize, a blocking cudaMemcpy, ...)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            opt.step()
        _sync(device)
    kernels = memcpy = memset = 0
    names: dict[str, int] = {}
    syncs: dict[str, int] = {}
    for e in prof.events():
        name = e.name or ""
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            kind = str(getattr(e, "activity_type", "") or "").lower()
            if "memcpy" in kind or name.startswith("Memcpy"):
                memcpy += 1
            elif "memset" in kind or name.startswith("Memset"):
                memset += 1
            else:
                kernels += 1
                short = name if len(name) <= 60 else name[:57] + "..."
                names[short] = names.get(short, 0) + 1
        elif "Synchronize" in name or name in ("cudaMemcpy", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2", "cudaMemcpy2D"):
            syncs[name] = syncs.get(name, 0) + 1
    # the trailing torch.cuda.synchronize() is ours, not the steps'
    if syncs.get("cudaDeviceSynchronize"):
        syncs["cudaDeviceSynchronize"] -= 1
        if not syncs["cudaDeviceSynchronize"]:
            del syncs["cudaDeviceSynchronize"]
    return dict(cuda_kernels_per_step=kernels / n, memcpy_per_step=memcpy / n, memset_per_step=memset / n,
                profiler_sync_calls_per_step=sum(syncs.values()) / n, profiler_sync_calls=syncs,
                top_kernels=dict(sorted(names.items(), key=lambda kv: -kv[1])[:6]))


def count_syncs(opt, device, n: int) -> dict:
    """torch's sync debug mode ("warn") around ``n`` steps: the synchronising calls it reports."""
    import warnings

    _sync(device)
    msgs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        text = str(w.message)
        if "synchroniz" in text.lower():
            msgs.append(text.splitlines()[0][:160])
    _sync(device)
    return dict(sync_debug_syncs_per_step=len(msgs) / n, sync_debug_messages=sorted(set(msgs))[:5])


def _state_bytes_any(opt) -> int:
    return state_bytes(opt.opt if isinstance(opt, Graphed) else opt)


def build_suite(specs, tensors, grads, device, dtype, shared: bool, errors: list, strict: bool):
    """Make every optimizer (its own parameter copy unless ``shared``; the gradients are shared and
    only read), take two steps (state creation, compilation) and note its memory."""
    opts, mem = [], {}
    common = None
    if shared:
        common = _alloc(tensors, device, dtype, seed=1)
        common = [torch.nn.Parameter(p) for p in common]
        for p, g in zip(common, grads):
            p.grad = g
    for name, make in specs:
        try:
            if shared:
                ps = common
            else:
                ps = [torch.nn.Parameter(p) for p in _alloc(tensors, device, dtype, seed=1)]
                for p, g in zip(ps, grads):
                    p.grad = g
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            opt = make(tensors, ps)
            for _ in range(2):
                opt.step()
            _sync(device)
            first_s = time.perf_counter() - t0
            m = dict(state_bytes=_state_bytes_any(opt), build_and_two_steps_s=first_s)
            if device.type == "cuda":
                m["peak_bytes_over_params"] = torch.cuda.max_memory_allocated(device) - base
                m["retained_bytes_over_params"] = torch.cuda.memory_allocated(device) - base
            mem[name] = m
            opts.append((name, opt))
        except Exception as e:  # one optimizer failing must not lose the others' numbers
            if strict:
                raise
            errors.append(f"{name}: {type(e).__name__}: {e}")
            print(f"  ERROR building {name}: {type(e).__name__}: {e}", flush=True)
    return opts, mem


def time_suite(opts, device, steps: int, warmup: int, burst: int) -> dict:
    """Rounds in rotating order; per step the device is idle at the start (a sync), so the event time is
    the step's latency including its launches. Plus ``burst`` steps back to back per optimizer."""
    cuda = device.type == "cuda"
    names = [n for n, _ in opts]
    res = {n: {"step_ms": [], "host_ms": []} for n in names}
    for _ in range(warmup):
        for _, opt in opts:
            opt.step()
    _sync(device)
    for r in range(steps):
        k = r % len(opts)
        for name, opt in opts[k:] + opts[:k]:
            _sync(device)
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            h0 = time.perf_counter()
            opt.step()
            h1 = time.perf_counter()
            if cuda:
                e1.record()
                e1.synchronize()
                res[name]["step_ms"].append(e0.elapsed_time(e1))
            else:
                res[name]["step_ms"].append(1e3 * (h1 - h0))
            res[name]["host_ms"].append(1e3 * (h1 - h0))
    for name, opt in opts:
        _sync(device)
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        h0 = time.perf_counter()
        for _ in range(burst):
            opt.step()
        if cuda:
            e1.record()
            e1.synchronize()
            res[name]["burst_ms_per_step"] = e0.elapsed_time(e1) / burst
        else:
            res[name]["burst_ms_per_step"] = 1e3 * (time.perf_counter() - h0) / burst
    return res


def _q(xs):
    return statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3


def summarize_suite(opts, times, mem, counts) -> list[dict]:
    base = times.get(S_BASE, {}).get("step_ms")
    base_state = mem.get(S_BASE, {}).get("state_bytes")
    rows = []
    for name, _ in opts:
        ts = times[name]["step_ms"]
        q = _q(ts)
        row = dict(name=name, median_ms=statistics.median(ts), p25_ms=q[0], p75_ms=q[2],
                   burst_ms_per_step=times[name]["burst_ms_per_step"],
                   host_ms_median=statistics.median(times[name]["host_ms"]),
                   ratio_to_adamw_fused=(statistics.median(a / b for a, b in zip(ts, base)) if base else float("nan")),
                   **mem[name], **counts.get(name, {}))
        row["state_ratio_to_adamw"] = row["state_bytes"] / base_state if base_state else float("nan")
        rows.append(row)
    return rows


def _fmt(x, spec=".2f", none="n/a"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def fmt_suite_table(rows, cuda: bool) -> str:
    head = ("| optimizer | step ms (median) | p25-p75 | back-to-back ms | host ms | vs AdamW fused | peak MiB over params "
            "| state MiB | kernels/step | Triton launches | aten ops/step | host reads | syncs |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = r.get("peak_bytes_over_params")
        lines.append(
            f"| {r['name']} | {r['median_ms']:.3f} | {r['p25_ms']:.2f}-{r['p75_ms']:.2f} | {r['burst_ms_per_step']:.3f} | "
            f"{r['host_ms_median']:.3f} | {_fmt(r['ratio_to_adamw_fused'])}x | "
            f"{_fmt(None if peak is None else peak / 2**20, '.1f')} | {r['state_bytes'] / 2**20:.2f} | "
            f"{_fmt(r.get('cuda_kernels_per_step'), '.1f')} | {_fmt(r.get('triton_launches_per_step'), '.1f')} | "
            f"{_fmt(r.get('aten_ops_per_step'), '.0f')} | {_fmt(r.get('host_reads_per_step'), '.0f')} | "
            f"{_fmt(r.get('sync_debug_syncs_per_step'), '.0f')} |")
    return "\n".join(lines)


def suite_targets(key: str, rows: list[dict], cuda: bool) -> dict:
    """Issue 16's targets for the Triton route (eager, default options)."""
    r = next((x for x in rows if x["name"] == S_TRITON), None)
    if r is None:
        return {}
    t = {}
    if cuda:
        t["<= 8 CUDA kernels per step"] = r.get("cuda_kernels_per_step", math.inf) <= 8
        t["no host sync (sync debug mode)"] = r.get("sync_debug_syncs_per_step", 1) == 0
        if key in ("resnet50", "vit_base"):
            t["step <= AdamW fused"] = r["ratio_to_adamw_fused"] <= 1.0
    t["no host read of a device value"] = r.get("host_reads_per_step", 1) == 0
    t["<= 8 Triton launches per step"] = r.get("triton_launches_per_step", math.inf) <= 8
    return t


# ---- the training step ---------------------------------------------------------------------------
def train_suite(key: str, cfg: dict, device, dtype, batch: int, steps: int, warmup: int, errors, strict, log):
    """forward + backward + step, the three configurations in one process taking turns; CUDA events
    per phase; peak memory per configuration (its first steps, from a reset, over what is allocated
    before them: activations, gradients, optimizer state, workspaces)."""
    import copy

    import torch.nn.functional as F

    import nerofy

    cuda = device.type == "cuda"
    amp = dtype == torch.bfloat16
    base_model = _create(cfg)
    torch.manual_seed(1)
    x = torch.randn(batch, *cfg["input"])
    y = torch.randint(0, cfg["classes"], (batch,))
    runs = {}
    for c in (T_BASE, T_TRITON, T_FOREACH):
        try:
            m = copy.deepcopy(base_model)
            if c == T_BASE:
                m = m.to(device)
                opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
            else:
                m, _ = nerofy.wrap(m, example_inputs=(x[:2],))
                m = m.to(device)
                opt = nerofy.Nero(nerofy.param_groups(m), fused=False if c == T_FOREACH else None)
                opt.project_()
            runs[c] = dict(model=m, opt=opt, fb=[], st=[])
        except Exception as e:
            if strict:
                raise
            errors.append(f"train {key} {c}: {type(e).__name__}: {e}")
            log(f"  ERROR building {c}: {type(e).__name__}: {e}")
    del base_model
    x, y = x.to(device), y.to(device)

    def step(r):
        m, opt = r["model"], r["opt"]
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cuda:
            ev[1].record()
        t1 = time.perf_counter()
        opt.step()
        if cuda:
            ev[2].record()
            ev[2].synchronize()
            return ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
        t2 = time.perf_counter()
        return 1e3 * (t1 - t0), 1e3 * (t2 - t1)

    mem = {}
    for c, r in runs.items():  # memory first, one configuration at a time, gradients of all others freed
        for rr in runs.values():
            rr["opt"].zero_grad(set_to_none=True)
        _sync(device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step(r)
        _sync(device)
        mem[c] = dict(state_bytes=state_bytes(r["opt"]))
        if cuda:
            mem[c]["train_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    names = list(runs)
    for i in range(warmup + steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for c in order:
            _sync(device)
            fb, st = step(runs[c])
            if i >= warmup:
                runs[c]["fb"].append(fb)
                runs[c]["st"].append(st)
    out = {}
    base_tot = [f + s for f, s in zip(runs[T_BASE]["fb"], runs[T_BASE]["st"])] if T_BASE in runs else None
    for c, r in runs.items():
        tot = [f + s for f, s in zip(r["fb"], r["st"])]
        out[c] = dict(step_ms_median=statistics.median(tot), fwd_bwd_ms_median=statistics.median(r["fb"]),
                      opt_step_ms_median=statistics.median(r["st"]),
                      ratio_to_adamw_median=(statistics.median(t / b for t, b in zip(tot, base_tot))
                                             if base_tot else float("nan")),
                      opt_ratio_to_adamw_median=(statistics.median(
                          t / b for t, b in zip(r["st"], runs[T_BASE]["st"])) if base_tot else float("nan")),
                      **mem[c])
    return out


def fmt_train_table(res: dict) -> str:
    lines = ["| model | configuration | step ms (median) | fwd+bwd ms | opt step ms | step vs AdamW | opt step vs AdamW "
             "| training peak MiB | state MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, d in res.items():
        for c, t in d["configs"].items():
            pk = t.get("train_peak_bytes")
            lines.append(f"| {key} | {c} | {t['step_ms_median']:.2f} | {t['fwd_bwd_ms_median']:.2f} | "
                         f"{t['opt_step_ms_median']:.3f} | {_fmt(t['ratio_to_adamw_median'])}x | "
                         f"{_fmt(t['opt_ratio_to_adamw_median'])}x | "
                         f"{_fmt(None if pk is None else pk / 2**20, '.0f')} | {t['state_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def _versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for mod in ("triton", "timm", "transformers", "pytorch_optimizer"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    try:
        import nerofy
        out["nerofy"] = nerofy.__version__
    except Exception:
        pass
    return out


def run_suite(args, argv) -> dict:
    """The GPU suite; on ``--device cpu`` the same code on CPU tensors (a smoke test)."""
    import logging

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    logging.getLogger("nerofy").setLevel(logging.ERROR)
    T0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", flush=True)

    from nerofy import _triton

    notes = []
    triton_ok = _triton.available()
    if not triton_ok:
        notes.append(f"Triton rows skipped: {_triton.unavailable_reason()}")
    elif not cuda:
        if _triton.interpreted():
            _triton.ON_CPU = True  # CPU tensors through the interpreted kernels
            notes.append("CPU run: the Triton rows run under triton's interpreter (TRITON_INTERPRET=1); their times "
                         "say nothing about a GPU")
        else:
            triton_ok = False
            notes.append("Triton rows skipped: triton was imported compiled (TRITON_INTERPRET=1 must be set before "
                         "it is first imported) and cannot run CPU tensors")
    if not cuda:
        notes.append("CPU run: no CUDA events (host wall time instead), no CUDA graphs, no CUDA profiler kernels, no "
                     "sync debug mode, no max_memory_allocated; aten ops and host reads per step stand in")
    try:
        import pytorch_optimizer  # noqa: F401
        po_ok = True
    except Exception:
        po_ok = False
    quick = args.quick
    models = dict(QUICK_SUITE_MODELS if quick else SUITE_MODELS)
    all_models = {**SUITE_MODELS, **QUICK_SUITE_MODELS}
    if args.models:
        models = {k: all_models[k] for k in args.models}
    train_keys = args.train_models if args.train_models is not None else list(QUICK_TRAIN_MODELS if quick else TRAIN_MODELS)
    steps = args.steps or (3 if quick else 30)
    warmup = 1 if quick else args.warmup
    burst = 2 if quick else 10
    count_n = 1 if quick else 3
    train_steps = args.train_steps or (2 if quick else 20)
    batch = args.train_batch or (2 if quick else 32)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated
    meta = dict(device=torch.cuda.get_device_name(device) if cuda else cpu_name(), device_type=device.type,
                capability=".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
                **_versions(), dtype=args.dtype, steps=steps, warmup=warmup, burst=burst, quick=quick,
                train_steps=train_steps, train_batch=batch, cpu_count=os.cpu_count(),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                triton_route=("compiled" if cuda else "interpreted") if triton_ok else "unavailable",
                command="python benchmarks/optimizer_step.py " + " ".join(argv))
    specs, skipped = suite_specs(device, triton_ok, po_ok)
    meta["skipped_rows"] = skipped
    errors: list[str] = []
    res = dict(meta=meta, notes=notes, models={}, train={}, errors=errors)
    stem = "optimizer_step_cuda" if cuda else "optimizer_step_suite_cpu"
    stem += "" if args.dtype == "float32" else f"_{args.dtype}"
    stem += "_quick" if quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    for n in notes:
        log(n)
    for key, cfg in models.items():
        log(f"{key}: tensor list")
        tensors, info = suite_tensors(key, cfg)
        log(f"{key}: {info['tensors']} tensors, {info['parameters'] / 1e6:.1f}M parameters "
            f"({info['parameters'] / 1e9:.3f}B), {info['constrained_tensors']} constrained; {info['source']}")
        pbytes = info["parameters"] * torch.empty((), dtype=dtype).element_size()
        shared = False
        if cuda:
            free, total = torch.cuda.mem_get_info(device)
            # a copy of the parameters per optimizer, AdamW's state twice theirs (fp32 for fp32 params)
            need = len(specs) * pbytes + 3 * 2 * info["parameters"] * 4 + pbytes
            shared = need > 0.6 * free
            info["free_gpu_bytes"] = free
        info["parameters_shared_by_all_optimizers"] = shared
        gen = torch.Generator(device=device).manual_seed(2)
        grads = [(torch.randn(t["shape"], generator=gen, device=device, dtype=torch.float32) * 1e-3).to(dtype)
                 for t in tensors]
        opts, mem = build_suite(specs, tensors, grads, device, dtype, shared, errors, args.strict)
        log(f"{key}: built {len(opts)} optimizers" + (" (one parameter set shared: memory)" if shared else ""))
        counts = {}
        for name, opt in opts:
            try:
                c = count_ops(opt, count_n)
                if cuda:
                    c.update(count_cuda_kernels(opt, device, count_n))
                    c.update(count_syncs(opt, device, count_n))
                counts[name] = c
            except Exception as e:
                if args.strict:
                    raise
                errors.append(f"{key} counting {name}: {type(e).__name__}: {e}")
                log(f"  ERROR counting {name}: {type(e).__name__}: {e}")
        times = time_suite(opts, device, steps, warmup, burst)
        rows = summarize_suite(opts, times, mem, counts)
        targets = suite_targets(key, rows, cuda)
        res["models"][key] = dict(info=info, rows=rows, targets=targets)
        print(f"\n## {key}\n{fmt_suite_table(rows, cuda)}\n" +
              "\n".join(f"- {'PASS' if ok else 'FAIL'}: {t}" for t, ok in targets.items()), flush=True)
        del opts, grads
        if cuda:
            torch.cuda.empty_cache()
        (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    for key in train_keys:
        cfg = all_models[key]
        if cfg["kind"] == "llama":
            continue
        log(f"train {key}: batch {batch} at {cfg['input'][1]}px, {train_steps} rounds")
        out = train_suite(key, cfg, device, dtype, batch, train_steps, 1, errors, args.strict, log)
        res["train"][key] = dict(batch=batch, input=cfg["input"], autocast_bf16=dtype == torch.bfloat16, configs=out)
        if cuda:
            torch.cuda.empty_cache()
        (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    if res["train"]:
        print("\n## training step\n" + fmt_train_table(res["train"]), flush=True)
    res["meta"]["total_s"] = time.perf_counter() - T0
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(suite_markdown(res))
    for e in errors:
        print(f"ERROR: {e}")
    log(f"wrote {args.out / stem}.md and .json")
    return res


def suite_markdown(res: dict) -> str:
    m = res["meta"]
    cuda = m["device_type"] == "cuda"
    md = [f"# Optimizer step on {'the GPU' if cuda else 'CPU tensors (the GPU suite, smoke run)'}: {m['device']}", "",
          f"{m['device']}" + (f" (sm {m['capability']})" if m.get("capability") else "") +
          f"; torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, timm {m['timm']}, transformers "
          f"{m['transformers']}, pytorch_optimizer {m['pytorch_optimizer']}; {m['date']}. Parameters "
          f"{m['dtype']} (Nero's state fp32 always; AdamW's in the parameter dtype), fixed gradients randn * 1e-3 in "
          f"the parameter dtype. {m['steps']} timed rounds after {m['warmup']} warm-up, optimizers in rotating "
          f"order; ratios are medians of per-round ratios. Triton route: {m['triton_route']}.", "",
          "Columns: *step ms* CUDA-event time of one step started on an idle device (launch latency included); "
          f"*back-to-back* {m['burst']} steps in a row, per step; *host ms* the CPU's time in `step()`; *peak MiB* "
          "`max_memory_allocated` over the parameters during construction and the first two steps (state, "
          "temporaries, a graph's pool); *kernels/step* CUDA kernels in torch.profiler (memcpy/memset apart, in "
          "the JSON); *Triton launches* `nerofy._triton.stats`; *aten ops* torch ops dispatched (a "
          "TorchDispatchMode: Triton launches are not aten ops); *host reads* `aten._local_scalar_dense` and the "
          "like; *syncs* synchronising calls reported by `torch.cuda.set_sync_debug_mode(\"warn\")`.", ""]
    md += [f"- {n}" for n in res["notes"]]
    for name, why in m["skipped_rows"].items():
        md.append(f"- row skipped: {name}: {why}")
    md.append("")
    for key, d in res["models"].items():
        info = d["info"]
        md += [f"## {key}", "",
               f"{info['tensors']} tensors, {info['parameters'] / 1e6:.1f}M parameters ({info['parameters'] / 1e9:.3f}B), "
               f"{info['constrained_tensors']} constrained (layouts from nerofy.wrap); {info['source']}"
               + ("; one parameter set shared by all optimizers (GPU memory)" if info.get("parameters_shared_by_all_optimizers") else "")
               + (f"; {info['unmatched_layouts']} tensors without a layout match (took 'auto')" if info.get("unmatched_layouts") else "")
               + ".", "", fmt_suite_table(d["rows"], cuda), ""]
        md += [f"- {'PASS' if ok else 'FAIL'}: {t}" for t, ok in d["targets"].items()]
        md.append("")
    if res["train"]:
        md += ["## Training step (forward + backward + step)", "",
               "Cross-entropy on a fixed random batch; the configurations take turns; `nerofy.wrap` on the CPU, "
               "then `.to(device)` and `Nero(nerofy.param_groups(model))`. Training peak: `max_memory_allocated` "
               "over the first two steps of each configuration alone, from what was allocated before them.", "",
               fmt_train_table(res["train"]), ""]
        for key, d in res["train"].items():
            md.append(f"- {key}: batch {d['batch']} at {d['input'][1]}px" + (", bf16 autocast" if d["autocast_bf16"] else ", fp32"))
        md.append("")
    if res["errors"]:
        md += ["## Errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    md += [f"Run: `{m['command'].rstrip()}`, {m['total_s']:.0f} s.", ""]
    return "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="*", default=None,
                    help="thread counts to run (default: 1 and all, i.e. torch's default thread count)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default 20; 5 with --quick)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, one warm-up")
    ap.add_argument("--model", default="resnet50", help="timm model name (default resnet50)")
    ap.add_argument("--torch-compile", action="store_true", help="also time Nero's update under torch.compile")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    g = ap.add_argument_group("GPU suite (--device cuda, or --device cpu --gpu-suite)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default): the resnet50 CPU comparison above; cuda: the GPU suite")
    g.add_argument("--gpu-suite", action="store_true",
                   help="run the GPU suite's code on --device cpu (a smoke test: use --quick)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="suite: parameter (and gradient) dtype; Nero's state stays fp32 (default float32)")
    g.add_argument("--models", nargs="+", default=None,
                   help="suite: tensor lists to time (" + ", ".join([*SUITE_MODELS, *QUICK_SUITE_MODELS]) + ")")
    g.add_argument("--train-models", nargs="*", default=None,
                   help="suite: models for the training step (default resnet50 vit_base; none: skip it)")
    g.add_argument("--train-batch", type=int, default=None, help="suite: training batch (default 32; 2 with --quick)")
    g.add_argument("--train-steps", type=int, default=None, help="suite: timed training rounds (default 20)")
    g.add_argument("--strict", action="store_true", help="suite: stop at the first error (default: note it, go on)")
    args = ap.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.device == "cuda" or args.gpu_suite:
        if args.device == "cpu":
            # before triton is first imported (timm imports it): CPU tensors through the interpreted kernels
            os.environ.setdefault("TRITON_INTERPRET", "1")
        return run_suite(args, argv)
    if args.dtype != "float32":
        ap.error("--dtype applies to the GPU suite only (--device cuda or --gpu-suite)")

    import timm

    all_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, all_threads})
    steps = args.steps or (5 if args.quick else 20)
    warmup = 1 if args.quick else args.warmup

    torch.manual_seed(0)
    model = timm.create_model(args.model)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    n_params = sum(p.numel() for p in params)
    meta = dict(
        model=args.model, tensors=len(params), parameters=n_params, torch=torch.__version__,
        python=platform.python_version(), cpu=cpu_name(), cpu_count=os.cpu_count(), default_threads=all_threads,
        steps=steps, warmup=warmup, date=datetime.datetime.now().isoformat(timespec="seconds"),
        load_average_before=_loadavg(),
    )
    try:
        import pytorch_optimizer
        meta["pytorch_optimizer"] = pytorch_optimizer.__version__
    except Exception:
        pass
    meta["fused_kernel"] = kernel_overheads()

    opts = make_optimizers(params, grads, args.torch_compile)
    results = {}
    md = [f"# Optimizer step: {args.model} on CPU", "",
          f"{meta['tensors']} tensors, {n_params / 1e6:.1f}M parameters; {meta['cpu']} ({meta['cpu_count']} CPUs); "
          f"torch {meta['torch']}; {steps} timed steps after {warmup} warm-up, optimizers interleaved; "
          "ratios are medians of per-round ratios. Gradients: fixed randn * 1e-3. "
          f"Load average before the run: {meta['load_average_before']} (a load above the CPU count means "
          "other processes shared the cores: multi-threaded rows then mostly measure waiting).", ""]
    for nt in threads:
        torch.set_num_threads(nt)
        times = bench(opts, steps, warmup)
        rows, targets, speedup_po = summarize(opts, times)
        results[str(nt)] = dict(rows=rows, targets=targets, speedup_vs_pytorch_optimizer_nero=speedup_po,
                                load_average_after=_loadavg())
        table = fmt_table(rows)
        head = f"## {nt} thread{'s' if nt > 1 else ''}"
        checks = [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in targets.items()]
        checks.append(f"- nerofy Nero (fused) is {speedup_po:.1f}x faster than pytorch_optimizer's Nero")
        print(f"\n{head}\n{table}\n" + "\n".join(checks), flush=True)
        md += [head, "", table, "", *checks, "", f"Load average after this block: {_loadavg()}.", ""]
    torch.set_num_threads(all_threads)
    comp = [o for n, o in opts if isinstance(o, CompiledNero)]
    if comp:
        meta["torch_compile_first_step_s"] = comp[0].compile_s

    fk = meta["fused_kernel"]
    md += ["## Fused kernel", ""]
    if fk.get("available"):
        md += [f"- built with `{fk.get('compiler')} {fk.get('flags')}` (OpenMP: {fk.get('openmp')}); "
               f"cold build {fk.get('cold_build_s', float('nan')):.2f} s, cached per machine afterwards",
               f"- fixed per-step cost (one 8x8 tensor): fused {fk['tiny_step_us_fused']:.0f} us, "
               f"foreach {fk['tiny_step_us_foreach']:.0f} us"]
    else:
        md += [f"- unavailable: {fk.get('reason')}"]
    if comp:
        md += [f"- torch.compile route: first step (compilation) {meta['torch_compile_first_step_s']:.1f} s"]
    md += ["", "## Routes", "",
           "- **foreach** (`Nero(fused=False)`): torch multi-tensor ops; every weight and gradient goes through "
           "memory about six times (gradient norms, step, centring, normalising), each op a separate pass.",
           "- **torch.compile** of the per-tensor update (row `Nero via torch.compile`, with `--torch-compile`): "
           "inductor emits separate reduction loops and a guard check per call; slower than foreach here, "
           "and its first step compiles for tens of seconds.",
           "- **fused C kernel** (`Nero(fused=None|True)`, nerofy/_fused.py): one pass per neuron while its row sits "
           "in L1/L2: squared gradient norm, v, `w += c g` with running sum and sum of squares, then centre and "
           "normalise in cache; OpenMP over neurons, dynamic scheduling. Memory traffic is read g, read w, "
           "write w (Adam fused: read w, g, m, v, write w, m, v). Built with the system C compiler through "
           "ctypes, no torch headers and no ninja, so the build takes well under a second (a torch C++ "
           "extension through `cpp_extension.load_inline` would compile the torch headers; not measured "
           "here). This route won.", ""]
    md += ["", f"Run: `python benchmarks/optimizer_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip() + ", "
           f"{meta['date']}.", ""]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer_step.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2) + "\n")
    (args.out / "optimizer_step.md").write_text("\n".join(md))
    print(f"\nwrote {args.out / 'optimizer_step.md'} and .json")


if __name__ == "__main__":
    main()
