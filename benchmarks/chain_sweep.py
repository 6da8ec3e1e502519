"""How far a chain of layers in series can turn per step: the evidence for nerofy.plan.CHAIN_REF.

Plain ReLU MLPs (training_quality.py's mlp benches: digits, batch 50, 30 epochs, width 64) at depths
10, 20, 30, 40 and 50, trained with every neuron turning a fixed angle per step: Nero with lr = angle /
0.1 and clip = 0.1, so the cap binds wherever a neuron's gradient is over a tenth of its running rms
(nearly every step), no cap factor (chain_ref=None). Each neuron then turns exactly ``angle``
radians per step and every layer of the chain turns together, so the function the chain computes
turns by about depth x angle per step. Five seeds per cell; final test accuracy.

The table says which angle each depth trains best at and where it stops training; the product
depth x angle at those points is what CHAIN_REF (with Nero's cap of 2 lr at lr 0.01) keeps a long
chain under.

    python benchmarks/chain_sweep.py              # all cells (resumable: finished runs are skipped)
    python benchmarks/chain_sweep.py --summary    # the table (also written to chain_sweep.md)
    python benchmarks/chain_sweep.py --quick      # smoke run: 2 epochs, one cell per depth
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import training_quality as TQ  # noqa: E402
import tq_models as M  # noqa: E402

import nerofy  # noqa: E402

DEPTHS = (10, 20, 30, 40, 50)
ANGLES = (0.005, 0.01, 0.02, 0.04)
CAP = 0.1  # Nero's clip in units of lr: lr = angle / CAP
OUT = TQ.RESULTS / "chain_sweep.jsonl"


def _label(angle: float) -> str:
    return f"every neuron {angle:g} rad"


def _turn(angle: float):
    return lambda model, ex: nerofy.wrap(model, lr=angle / CAP, clip=CAP, chain_ref=None, example_inputs=ex)


for _d in DEPTHS:
    TQ.BENCHES.setdefault(f"mlp{_d}x64", TQ.Bench(lambda d=_d: M.mlp(d, 64), "digits", epochs=30, seeds=5, chatty=False))
for _a in ANGLES:
    TQ.CONFIGS[_label(_a)] = _turn(_a)


def table(rows: list[dict]) -> str:
    done = {}
    for r in rows:
        if r["status"] in ("ok", "diverged") and r["schedule"] == "const":
            done[(r["bench"], r["config"], r["seed"])] = r["value"]
    lines = ["| depth | " + " | ".join(f"{a:g} rad" for a in ANGLES) + " | best angle x depth |",
             "|---" * (len(ANGLES) + 2) + "|"]
    for d in DEPTHS:
        cells, best = [], None
        for a in ANGLES:
            vals = [v for (b, c, _), v in done.items() if b == f"mlp{d}x64" and c == _label(a)]
            if not vals:
                cells.append("")
                continue
            m = statistics.fmean(vals)
            cells.append(f"{m:.3f} ({min(vals):.3f}) n={len(vals)}")
            if best is None or m > best[0]:
                best = (m, a)
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {best[1] * d:.2f} |" if best else f"| {d} | " +
                     " | ".join(cells) + " | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", action="store_true", help="no training: the table from the JSONL")
    ap.add_argument("--quick", action="store_true", help="2 epochs, one angle per depth, seed 0 (a smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    out = a.out or (OUT.with_name("chain_sweep_quick.jsonl") if a.quick else OUT)
    if a.summary:
        text = table(TQ.read_rows(out))
        print(text)
        out.with_suffix(".md").write_text(f"# Fixed turning angle per step x depth ({out.name})\n\n"
                                          "Final test accuracy, mean (worst seed), plain ReLU MLPs of width 64 on digits; "
                                          "see benchmarks/chain_sweep.py.\n\n" + text + "\n")
        return
    angles = ANGLES[1:2] if a.quick else ANGLES
    args = ["--bench", *[f"mlp{d}x64" for d in DEPTHS], "--configs", *[_label(x) for x in angles],
            "--schedules", "const", "--seeds", *(["0"] if a.quick else [str(s) for s in range(5)]),
            "--order", "config-major", "--out", str(out)]
    TQ.main(args + (["--epochs", "2"] if a.quick else []))
    print(table(TQ.read_rows(out)))


if __name__ == "__main__":
    main()
