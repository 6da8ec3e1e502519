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


def test_training_quality_quick_resumes_and_summarises(tmp_path):
    """benchmarks/training_quality.py: a quick MLP + GPT-2 run appends one row per run, a second
    start finds them done, and --summary renders every config."""
    out = tmp_path / "tq.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "training_quality.py"), "--quick", "--bench", "mlp20x64", "gpt2",
           "--configs", "nerofy", "paper Nero", "AdamW default", "--schedules", "const", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows), rows
    assert {(r["bench"], r["config"]) for r in rows} == {(b, c) for b in ("mlp20x64", "gpt2")
                                                        for c in ("nerofy", "paper Nero", "AdamW default")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 6  # resumed: nothing re-run
    s = subprocess.run(cmd[:2] + ["--summary", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert s.returncode == 0 and "| nerofy | const |" in s.stdout and "paper Nero" in s.stdout, s.stdout + s.stderr


def test_chain_sweep_quick_writes_its_table(tmp_path):
    """benchmarks/chain_sweep.py: one fixed-angle run per depth, then the depth x angle table."""
    out = tmp_path / "cs.jsonl"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chain_sweep.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["bench"] for r in rows) == ["mlp10x64", "mlp20x64", "mlp30x64", "mlp40x64", "mlp50x64"]
    assert all(r["status"] == "ok" and r["config"] == "every neuron 0.01 rad" for r in rows)
    s = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chain_sweep.py"), "--summary", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert s.returncode == 0 and "| 50 |" in s.stdout and (tmp_path / "cs.md").exists(), s.stdout + s.stderr
