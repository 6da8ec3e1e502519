"""`nerofy zoo --source torchvision|transformers`: other model zoos through the same workers."""
import json

import pytest

pytest.importorskip("typer")
pytest.importorskip("torchvision")
from typer.testing import CliRunner  # noqa: E402

from nerofy_cli.app import app  # noqa: E402


def _rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_zoo_source_torchvision_structural_and_check(tmp_path):
    runner = CliRunner()
    out = tmp_path / "tv.jsonl"
    res = runner.invoke(app, ["zoo", "--source", "torchvision", "squeezenet1_0", "mobilenet_v3_small",
                              "--structural", "--out", str(out), "--jobs", "1"])
    assert res.exit_code == 0, res.stderr
    rows = _rows(out)
    assert sorted(r["name"] for r in rows) == ["torchvision:mobilenet_v3_small", "torchvision:squeezenet1_0"]
    assert all(r["status"] == "pass" and r["source"] == "torchvision" for r in rows)
    assert all(r["tensors_by_role"].get("neuron", 0) > 0 for r in rows)
    # resume recognises the prefixed names: nothing left to run
    res = runner.invoke(app, ["zoo", "--source", "torchvision", "squeezenet1_0", "--structural", "--out", str(out),
                              "--resume"])
    assert res.exit_code == 0 and "0 to run" in res.stderr
    full = tmp_path / "tv_full.jsonl"
    res = runner.invoke(app, ["zoo", "--source", "torchvision", "squeezenet1_0", "--out", str(full), "--jobs", "1",
                              "--steps", "1"])
    assert res.exit_code == 0, res.stderr
    (row,) = _rows(full)
    assert row["status"] == "pass" and row["mode"] == "check" and row["axes"]["fail"] == 0


def test_zoo_source_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["zoo", "--source", "keras"])
    assert res.exit_code == 1 and "unknown --source 'keras'" in res.stderr
    res = runner.invoke(app, ["zoo", "--source", "torchvision", "resnet1800", "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 1 and "no torchvision model matches" in res.stderr and "torchvision:resnet18" in res.stderr
    res = runner.invoke(app, ["zoo", "--source", "torchvision", "resnet18", "--grad-checkpointing",
                              "--out", str(tmp_path / "y.jsonl")])
    assert res.exit_code == 1 and "--grad-checkpointing applies to the full check of timm models" in res.stderr


def test_zoo_source_globs_and_exclude():
    # globs and --exclude work with or without the source's prefix
    res = CliRunner().invoke(app, ["zoo", "--source", "torchvision", "ssd*", "torchvision:vit_b*", "-x", "*lite*",
                                   "--list"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.split() == ["torchvision:ssd300_vgg16", "torchvision:vit_b_16", "torchvision:vit_b_32"]


def test_zoo_source_structural_plans_the_default_config_on_meta(tmp_path):
    """A Hugging Face type's structural row is its default (full-size) config on meta, planned by a
    record trace of meta example inputs synthesised from the model (real parameter counts, no memory),
    not left to module rules; the causal-LM head comes with a decoder."""
    pytest.importorskip("transformers")
    out = tmp_path / "st.jsonl"
    res = CliRunner().invoke(app, ["zoo", "--source", "transformers", "gpt2", "--structural", "--out", str(out),
                                   "--jobs", "1"])
    assert res.exit_code == 0, res.stderr
    (row,) = _rows(out)
    assert row["status"] == "pass" and row["tracer"] == "record" and "note" not in row  # no real forward needed
    assert row["total_params"] == 124_439_808 and row["model_class"] == "GPT2LMHeadModel"  # gpt2 (124M)
    assert row["inputs"] == {"input_ids": [2, 16]}
    # 12 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) + wpe; wte is the tied table
    assert row["tensors_by_role"]["neuron"] == 49 and "free" not in row["tensors_by_role"]
