"""What one ragged 3-sample batch does to Nero: a ViT-Tiny on digits, loss on fixed training images
after every step.

The digits train split has 1347 = 21 x 64 + 3 images, so iterating ``range(0, 1347, 64)`` ends every
epoch on a batch of 3. This trains the ViT-Tiny of train_timm_digits.py (16x16, patch 2, 6 blocks)
for 2 epochs that way with nerofy (lr 0.01) and with AdamW (defaults), and after every step records
the cross-entropy on the same 256 training images (no grad). Nero has no momentum, so the 3-sample
step is taken at full angle.

    python benchmarks/ragged_batch.py [--quick]     # writes results/ragged_batch.json
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import nerofy  # noqa: E402
import train_timm_digits as T  # noqa: E402
from train_digits import load_data  # noqa: E402

logging.getLogger("nerofy").setLevel(logging.ERROR)


def run(kind: str, data, epochs: int, quick: bool) -> list[dict]:
    Xtr, ytr = data
    torch.manual_seed(0)
    model = T.create("vit_tiny", 16, quick)
    if kind == "nerofy":
        model, opt = nerofy.wrap(model, lr=0.01, example_inputs=(Xtr[:2],))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1000)
    xb, yb = Xtr[:256], ytr[:256]
    trace = []
    for ep in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), 64):  # ragged on purpose: the last batch holds len(Xtr) % 64 images
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                trace.append({"epoch": ep, "batch": len(idx), "fixed_loss": F.cross_entropy(model(xb), yb).item()})
    return trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 2-block ViT, 1 epoch")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--plots", type=Path, default=None, help="unused (no plot); accepted for uniformity")
    a = ap.parse_args()
    torch.set_num_threads(1)
    d = load_data()["test"]
    data = (T.images(d[0], 16), d[1])
    res = {"meta": {"quick": a.quick, "epochs": 1 if a.quick else 2, "train_images": len(d[0])}, "runs": {}}
    for kind in ("nerofy", "AdamW"):
        trace = run(kind, data, res["meta"]["epochs"], a.quick)
        res["runs"][kind] = trace
        small = [k for k, t in enumerate(trace) if t["batch"] < 64]
        jumps = [(trace[k - 1]["fixed_loss"], trace[k]["fixed_loss"]) for k in small if k > 0]
        print(f"{kind}: loss on 256 fixed training images before -> after each {trace[small[0]]['batch']}-sample "
              f"step: " + ", ".join(f"{a_:.2f} -> {b_:.2f}" for a_, b_ in jumps), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / ("ragged_batch_quick.json" if a.quick else "ragged_batch.json")).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
