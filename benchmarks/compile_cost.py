"""What torch.compile costs and gains on a nerofy-wrapped model (CPU): compiling the model, and
compiling the optimizer step.

For each model, one training step = forward + loss + backward + ``opt.step()``. Routes:

* ``eager``: the wrapped model and Nero as they are (Nero's default fused C kernel);
* ``compile model``: ``torch.compile(model)`` (inductor), Nero eager;
* ``compile step (fused=None)``: eager model, ``torch.compile(opt.step)`` with Nero's default
  route (the ctypes kernel is opaque to dynamo: graph breaks around it);
* ``compile step (foreach)``: eager model, ``torch.compile(opt.step)`` of ``Nero(fused=False)`` (dynamo
  traces the foreach update and inductor fuses it);
* ``compile both``: ``torch.compile(model)`` and ``torch.compile(opt.step)`` with the foreach Nero;
* ``plain eager`` / ``plain compile``: the same model unwrapped with ``torch.optim.Adam(fused=True)``,
  to show what the parametrization adds under each route.

Every route starts from the same weights and batch; the first step's time (which includes
compilation) is reported apart from the median of the following steps. ``max |loss - eager|``
compares each wrapped route's losses with eager's, step by step (float rounding only).

    python benchmarks/compile_cost.py                 # resnet18, vit_tiny, bert-small; 1 thread
    python benchmarks/compile_cost.py --quick         # tiny MLP only (a smoke run)

Writes benchmarks/results/compile_cost.md and .json (``--out`` to change the folder).
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
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# models: name -> (factory, batch, loss(output, batch))
# ---------------------------------------------------------------------------------------------
def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 10))


def _resnet18():
    import timm

    return timm.create_model("resnet18", num_classes=10)


def _vit_tiny():
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10)


class _Bert(nn.Module):
    def __init__(self):
        super().__init__()
        import transformers

        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=256, max_position_embeddings=64)
        self.bert = transformers.BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(128, 10)

    def forward(self, ids):
        return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])


def _images(b, s):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, s, s, generator=g), torch.randint(0, 10, (b,), generator=g)


def _tokens(b, n):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (b, n), generator=g), torch.randint(0, 10, (b,), generator=g)


MODELS = {
    "mlp": (_mlp, lambda: (torch.randn(16, 32, generator=torch.Generator().manual_seed(0)),
                           torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1)))),
    "resnet18 (timm, 8x3x64x64)": (_resnet18, lambda: _images(8, 64)),
    "vit_tiny_patch16 (timm, 8x3x64x64)": (_vit_tiny, lambda: _images(8, 64)),
    "bert 2x128 (transformers, 8x32 tokens)": (_Bert, lambda: _tokens(8, 32)),
}

ROUTES = ["eager", "compile model", "compile step (fused=None)", "compile step (foreach)", "compile both",
          "plain eager", "plain compile"]


def run_route(route: str, factory, batch, steps: int) -> dict:
    import nerofy

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = factory()
    x, y = batch
    if route.startswith("plain"):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        wrapped = model
    else:
        fused = False if route in ("compile step (foreach)", "compile both") else None
        wrapped, opt = nerofy.wrap(model, fused=fused, example_inputs=(x,))
    fwd = torch.compile(wrapped) if route in ("compile model", "compile both", "plain compile") else wrapped
    step = torch.compile(opt.step) if route.startswith("compile step") or route == "compile both" else opt.step
    wrapped.train()
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    steady = statistics.median(times[1:])
    return {"first_s": round(times[0], 3), "compile_s": round(times[0] - steady, 3),
            "step_ms": round(1000 * steady, 2),
            "p25_p75_ms": [round(1000 * q, 2) for q in statistics.quantiles(times[1:], n=4)[::2]],
            "losses": losses}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("nerofy").setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    names = ["mlp"] if a.quick else (a.models or [n for n in MODELS if n != "mlp"])
    steps = 5 if a.quick else a.steps
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": a.threads,
           "steps": steps, "load_before": _load(), "models": {}}
    for name in names:
        factory, mk = MODELS[[k for k in MODELS if k.startswith(name)][0]] if name not in MODELS else MODELS[name]
        full = name if name in MODELS else [k for k in MODELS if k.startswith(name)][0]
        batch = mk()
        res = {}
        for route in ROUTES:
            try:
                res[route] = run_route(route, factory, batch, steps)
            except Exception as e:  # a route that does not work is a result too
                res[route] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            print(f"{full:40s} {route:28s} {res[route]}", file=sys.stderr, flush=True)
        eager = res["eager"].get("losses", [])
        for route, r in res.items():
            if "losses" in r and not route.startswith("plain") and eager:
                r["max_loss_diff_vs_eager"] = max(abs(p - q) for p, q in zip(r["losses"], eager))
        out["models"][full] = res
    out["load_after"] = _load()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    stem = "compile_cost_quick" if a.quick else "compile_cost"
    (Path(a.out) / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (Path(a.out) / f"{stem}.md").write_text(render(out))
    print(render(out))


def render(out: dict) -> str:
    lines = [f"# torch.compile cost on nerofy-wrapped models (CPU, {out['threads']} thread)", "",
             f"torch {out['torch']}; {out['cpus']} CPUs; {out['steps']} timed steps after the first (which "
             f"compiles); load average before {out['load_before']}, after {out['load_after']} (a load above the "
             "CPU count means other processes shared the cores: expect noise).", ""]
    for name, res in out["models"].items():
        base = res.get("eager", {}).get("step_ms")
        lines += [f"## {name}", "", "| route | first step s | compile s (first - median) | step ms (median) | "
                  "p25-p75 ms | vs eager | max abs loss diff vs eager |", "|---|---:|---:|---:|---:|---:|---:|"]
        for route, r in res.items():
            if "error" in r:
                lines.append(f"| {route} | error: {r['error']} | | | | | |")
                continue
            diff = r.get("max_loss_diff_vs_eager")
            lines.append(f"| {route} | {r['first_s']:.2f} | {r['compile_s']:.2f} | {r['step_ms']:.1f} | "
                         f"{r['p25_p75_ms'][0]:.1f}-{r['p25_p75_ms'][1]:.1f} | "
                         f"{(r['step_ms'] / base) if base else float('nan'):.2f}x | "
                         f"{'' if diff is None else f'{diff:.1e}'} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
