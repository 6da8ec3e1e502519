"""How long Nero's steps are in practice: ||g|| / sqrt(v_hat) per neuron, before the cap (a diagnostic).

A neuron turns by ``lr * min(r, cap)`` with ``r = ||g|| / sqrt(v_hat)`` (``v_hat`` as the step has it,
with this step's sample: the whole gradient's, or the clipped one's with ``clip_v``). For a gradient of steady size
``r`` is about 1; a running average inflated by a spike makes it small for the ~1/(1 - beta) steps that
follow. This trains training_quality.py's benches (seed 0, constant lr) under the given configurations
and reports, for the balanced (per-neuron) tensors over five equal phases of training: the mean of
``r``, the share of neuron-steps with ``r < 0.5``, and the share at or above the cap (the step the
optimizer actually took is ``min(r, cap)`` lr).

    python benchmarks/step_ratio.py                                    # mlp50x64 and gpt2, previous and new defaults
    python benchmarks/step_ratio.py --bench mlp50x64 --configs nerofy  # one cell
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import training_quality as TQ  # noqa: E402

from nerofy.optim import _clipped_sample, _layout_of, clip_inv  # noqa: E402

PHASES = 5


def instrument(opt) -> list[list[torch.Tensor]]:
    """Wrap ``opt.step`` to record, before each step, (r, cap) of every neuron of every per-neuron tensor."""
    seen: list[list[torch.Tensor]] = []
    step = opt.step

    def recording_step(closure=None):
        rs = []
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    st = opt.state.get(p)
                    lay = _layout_of(p, group)
                    if p.grad is None or not st or lay.elementwise:
                        continue
                    gv, dims = lay.neuron_view(p.grad.float())
                    sq = gv.square().sum(dims, keepdim=True)
                    beta, t = group["beta"], int(st["step"]) + 1
                    ci = clip_inv(group, p)
                    sample = _clipped_sample(sq, st["v"], t, beta, ci if group.get("clip_v", True) else 0.0)
                    v_hat = (beta * st["v"] + (1 - beta) * sample) / (1 - beta ** t)  # as this step will have it
                    r = (sq / v_hat.clamp_min(1e-30)).sqrt().flatten()
                    rs.append(torch.stack([r, torch.full_like(r, 1 / ci if ci else float("inf"))]))
        seen.append(rs)
        return step(closure)

    opt.step = recording_step
    return seen


def phases(seen) -> list[dict]:
    out = []
    n = len(seen)
    for i in range(PHASES):
        chunk = [x for rs in seen[i * n // PHASES:(i + 1) * n // PHASES] for x in rs]
        if not chunk:
            continue
        r, cap = torch.cat(chunk, 1)
        out.append({"mean_r": round(float(r.mean()), 3), "share_below_half": round(float((r < 0.5).float().mean()), 3),
                    "share_at_cap": round(float((r >= cap).float().mean()), 3),
                    "mean_step_in_lr": round(float(torch.minimum(r, cap).mean()), 3)})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", nargs="+", default=["mlp50x64", "gpt2"], choices=list(TQ.BENCHES))
    ap.add_argument("--configs", nargs="+", default=["nerofy previous defaults", "nerofy"])
    ap.add_argument("--out", type=Path, default=TQ.RESULTS / "step_ratio.json")
    ap.add_argument("--quick", action="store_true", help="2 epochs / 20 steps (a smoke run)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ns = argparse.Namespace(steps=20 if a.quick else 0, epochs=2 if a.quick else 0, eval_every=10 if a.quick else 0,
                            quick=a.quick, threads=1)
    results = []
    for bench in a.bench:
        for config in a.configs:
            build, seen = TQ.CONFIGS[config], []

            def hooked(model, ex, build=build, seen=seen):
                model, opt = build(model, ex)
                seen.append(instrument(opt))
                return model, opt

            TQ.CONFIGS[config] = hooked
            try:
                row = TQ.run_one(bench, config, "const", 0, ns, lambda m: None)
            finally:
                TQ.CONFIGS[config] = build
            res = {"bench": bench, "config": config, "value": row["value"], "metric": row["metric"],
                   "phases": phases(seen[0]) if seen else []}
            results.append(res)
            print(f"{bench} {config}: {row['metric']} {row['value']:.4f}")
            for i, ph in enumerate(res["phases"]):
                print(f"  phase {i + 1}/{PHASES}: mean r {ph['mean_r']:.2f}, r < 0.5 {ph['share_below_half']:.0%}, "
                      f"at the cap {ph['share_at_cap']:.0%}, mean step {ph['mean_step_in_lr']:.2f} lr")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": {**TQ.meta(ns), "quick": a.quick}, "results": results}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
