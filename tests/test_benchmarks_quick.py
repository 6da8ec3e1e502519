"""Smoke tests: each training benchmark's --quick run finishes and writes its JSON and plot.

The four quick runs took ~40 s together on an idle 2-core machine (timm import and model creation
dominate), so they are part of the default run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("train_digits.py", "train_digits.json", "digits_curves.png"),
    ("char_lm.py", "char_lm.json", "char_lm.png"),
    ("train_timm_digits.py", "train_timm_digits.json", "timm_digits.png"),
    ("train_step.py", "train_step.json", "train_step.png"),
    ("ragged_batch.py", "ragged_batch_quick.json", None),
    ("bn_diagnosis.py", "bn_diagnosis_quick.json", None),
]


@pytest.mark.parametrize("script,out_json,png", CASES, ids=[c[0] for c in CASES])
def test_quick(tmp_path, script, out_json, png):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(tmp_path),
                        "--plots", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / out_json).read_text())
    assert data["meta"]["quick"] is True
    if png:
        assert (tmp_path / png).stat().st_size > 0
