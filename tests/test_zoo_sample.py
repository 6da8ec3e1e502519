"""CI: the full check (``nerofy zoo``) on a fixed sample of small, diverse timm architectures must
match ``model_zoo_checks/expected.json`` (every architecture's status from the committed sweep,
written by ``nerofy report --expected-out``): any regression fails.

The sample: timm's tiny ``test_*`` models (resnet, relpos ViT, convnext, efficientnet, byobnet,
nfnet, maxvit, mambaout) and small real ones (lcnet, mobilenetv3, xcit and its attention temperature,
levit's attention biases, mobilevit, efficientvit, convit's gated
positional attention in timm leaf modules, eva02's rotary embeddings). One Nero step each keeps it
under about a minute on two cores.
"""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("typer")
pytest.importorskip("timm")
from typer.testing import CliRunner  # noqa: E402

from nerofy_cli.app import app  # noqa: E402

EXPECTED = os.path.join(os.path.dirname(__file__), "..", "model_zoo_checks", "expected.json")
SAMPLE = ["convit_tiny", "efficientvit_m0", "eva02_tiny_patch14_224", "lcnet_050", "levit_128s", "mobilenetv3_small_050",
          "mobilevit_xxs", "test_byobnet", "test_convnext", "test_efficientnet", "test_mambaout", "test_maxvit",
          "test_nfnet", "test_resnet", "test_vit_relpos", "xcit_nano_12_p16_224"]


def test_expected_covers_the_zoo():
    import timm

    with open(EXPECTED) as f:
        expected = json.load(f)
    assert sorted(expected) == sorted(timm.list_models())
    assert all(expected[n] == "pass" for n in SAMPLE)


def test_zoo_sample_has_no_regression(tmp_path):
    out = tmp_path / "sample.jsonl"
    res = CliRunner().invoke(app, ["zoo", *SAMPLE, "--out", str(out), "--steps", "1", "--timeout", "240",
                                   "--expected", EXPECTED])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    got = {r["name"]: (r["status"], r["error"]) for r in rows}
    assert res.exit_code == 0, f"{res.stderr}\n{got}"
    assert set(got) == set(SAMPLE)
    said = " ".join(res.stderr.split())  # rich wraps long lines
    assert "no regression against" in said and f"({len(SAMPLE)} models)" in said
    for r in rows:
        if r["status"] == "pass":
            assert r["axes"].get("fail", 0) == 0 and r["max_constraint_error"] < 1e-4
            assert r["tracer"] and r["constrained_share"] > 0.5


# --- transformers: every config type's full check on its shrunk config (model_zoo_checks/check_transformers.jsonl)
TF_EXPECTED = os.path.join(os.path.dirname(__file__), "..", "model_zoo_checks", "expected_transformers.json")
TF_ROWS = os.path.join(os.path.dirname(__file__), "..", "model_zoo_checks", "check_transformers.jsonl")
# one type per family the generic path serves: encoder, decoder, MoE decoder, state-space, encoder-decoder,
# speech (features and raw audio), vision, video, two-tower and vision-language models
TF_SAMPLE = ["transformers:" + t for t in ("bert", "gpt2", "mixtral", "mamba", "t5", "whisper", "wav2vec2", "vit",
                                           "vivit", "clip", "llava", "qwen2_vl")]


def test_transformers_expected_covers_every_config_type():
    pytest.importorskip("transformers")
    import transformers

    from nerofy import hf

    with open(TF_EXPECTED) as f:
        expected = json.load(f)
    with open(TF_ROWS) as f:
        swept = {json.loads(line).get("versions", {}).get("transformers") for line in f}
    if swept != {transformers.__version__}:
        pytest.skip(f"the committed sweep ran on transformers {sorted(map(str, swept))}, "
                    f"this is {transformers.__version__}")
    assert sorted(expected) == sorted("transformers:" + t for t in hf.model_types())
    assert all(expected[n] == "pass" for n in TF_SAMPLE)


def test_transformers_zoo_sample_has_no_regression(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "sample.jsonl"
    res = CliRunner().invoke(app, ["zoo", "--source", "transformers", *TF_SAMPLE, "--out", str(out), "--steps", "1",
                                   "--timeout", "240", "--expected", TF_EXPECTED])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    got = {r["name"]: (r["status"], r["error"]) for r in rows}
    assert res.exit_code == 0, f"{res.stderr}\n{got}"
    assert set(got) == set(TF_SAMPLE)
    said = " ".join(res.stderr.split())
    assert "no regression against" in said and f"({len(TF_SAMPLE)} models)" in said
    for r in rows:
        assert r["status"] == "pass" and r["source"] == "transformers"
        assert r["axes"].get("fail", 0) == 0 and r["max_constraint_error"] < 1e-4
        assert r["shrink_level"] in (1, 2) and r["total_params"] < 30_000_000
        assert r["versions"]["transformers"]
