"""Models beyond timm (issue item 5): every torchvision model (classification, detection,
segmentation, video, optical flow, quantization-ready; weights=None) and Hugging Face transformers
built from configs (encoder, decoder, mixture of experts, encoder-decoder, vision, video, speech, time
series, text + image), through the factories of cli/sources.py (the ones
``nerofy zoo --source torchvision|transformers`` runs) and nerofy.check.check_model (plan, neuron
axes verified on the plain model, wrap, forward, backward, Nero steps, constraint).

A sample runs by default; the rest of the curated list is marked slow. The full sweeps are in
model_zoo_checks/check_torchvision.jsonl and check_transformers.jsonl.
"""
from __future__ import annotations

import logging

import pytest
import torch

import nerofy
from nerofy.check import check_model

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

from nerofy_cli import sources as S  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet(quiet_single_thread):
    yield


def _check(source, name, steps=2):
    spec = S.get(source, name)
    torch.manual_seed(0)
    model = spec.create()
    # a transformers type's inputs are synthesised from the model itself (nerofy.example_inputs)
    inputs = spec.inputs(2, 0, model=model) if source == "transformers" else spec.inputs(2, 0)
    r = check_model(model, inputs, steps=steps, loss_fn=spec.loss, plan_inputs=inputs)
    assert r.status == "pass", f"{spec.full_name}: {r.status}: {r.error}"
    assert r.axes.get("fail", 0) == 0, r.axis_failures
    assert r.constrained_share > 0.5, r.constrained_share
    return r, model


FAST_TV = ["resnet18", "lraspp_mobilenet_v3_large", "r3d_18", "quantized_resnet18"]
SLOW_TV = ["mobilenet_v3_small", "vit_b_32", "swin_t", "convnext_tiny", "efficientnet_b0", "densenet121", "regnet_y_400mf",
           "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet", "inception_v3", "maxvit_t", "deeplabv3_mobilenet_v3_large",
           "fcn_resnet50", "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
           "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn", "ssdlite320_mobilenet_v3_large", "ssd300_vgg16",
           "raft_small", "swin3d_t", "s3d", "quantized_shufflenet_v2_x0_5"]
FAST_HF = ["bert", "gpt2", "t5", "vit", "wav2vec2", "mixtral"]
SLOW_HF = ["roberta", "distilbert", "llama", "bart", "whisper", "mistral", "deepseek_v3", "qwen3_moe", "mamba", "rwkv",
           "deberta_v2", "swin", "mobilevit", "xlnet", "reformer", "fnet", "mamba2", "switch_transformers", "detr",
           "patchtst", "clip"]


def test_sources_list_and_lookup():
    tv, hf = S.names("torchvision"), S.names("transformers")
    assert {"resnet18", "fasterrcnn_resnet50_fpn", "deeplabv3_resnet50"} <= set(tv)
    assert sorted(tv) == sorted(torchvision.models.list_models())  # every torchvision model
    assert {S.get("torchvision", n).task for n in tv} == {"classification", "detection", "segmentation", "video",
                                                          "optical_flow", "quantizable"}
    # every config type of the installed transformers; "unknown": a config-only type (no model class),
    # "other": a model whose main input is none of text, pixels, audio or time series
    tasks = {S.get("transformers", n).task for n in hf}
    assert {"encoder", "decoder", "encoder-decoder", "vision", "speech", "video", "time-series",
            "multimodal"} <= tasks <= {"encoder", "decoder", "encoder-decoder", "vision", "speech", "video",
                                       "time-series", "multimodal", "other", "unknown"}
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert hf == sorted(CONFIG_MAPPING_NAMES)
    assert S.get("torchvision", "torchvision:resnet18").name == "resnet18"
    with pytest.raises(KeyError, match="resnet18"):
        S.get("torchvision", "resnet81")
    with pytest.raises(KeyError, match="unknown source"):
        S.names("keras")


@pytest.mark.parametrize("name", FAST_TV + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_TV])
def test_torchvision(name):
    _check("torchvision", name)


@pytest.mark.parametrize("name", FAST_HF + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_HF])
def test_transformers(name):
    _check("transformers", name)


def test_gpt2_conv1d_weights_are_neurons_along_their_output_axis():
    """GPT-2's Conv1D stores weights (in, out) and calls addmm: the neuron axis is 1, not 0."""
    spec = S.get("transformers", "gpt2")
    model = spec.create()
    plan = nerofy.plan(model, spec.inputs(2, 0))
    e = plan["transformer.h.0.mlp.c_fc.weight"]
    assert e.role == "neuron" and e.axes == (1,), e


def test_tied_lm_head_and_embedding_get_one_role():
    spec = S.get("transformers", "gpt2")
    model = spec.create()
    assert model.lm_head.weight is model.transformer.wte.weight
    r, model = _check("transformers", "gpt2", steps=1)
    # one stored tensor behind both (the balanced weight is recomputed per access)
    assert model.lm_head.parametrizations.weight.original is model.transformer.wte.parametrizations.weight.original
    torch.testing.assert_close(model.lm_head.weight, model.transformer.wte.weight, rtol=0, atol=0)


def test_mixtral_experts_are_neurons_per_expert_and_output():
    """Mixtral's experts (E, out, in) run through a grouped matmul: every expert's every output row
    is a neuron; the router is a plain linear."""
    r, model = _check("transformers", "mixtral", steps=1)
    plan = nerofy.plan(model)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        e = plan[name]
        assert e.role == "neuron" and e.axes == (0, 1) and e.fan_in == e.shape[2], e
    assert plan["model.layers.0.mlp.gate.weight"].axes == (0,)
    assert r.constrained_share > 0.9


def test_detection_in_train_mode_sums_its_losses():
    spec = S.get("torchvision", "fasterrcnn_mobilenet_v3_large_320_fpn")
    assert spec.task == "detection"
    out = {"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(2.0)}
    assert float(spec.loss(out)) == 3.0


def test_check_job_row_fields(monkeypatch):
    row = S.check_job("transformers", "bert", steps=1, verify=False)
    assert row["name"] == "transformers:bert" and row["status"] == "pass" and row["family"] == "encoder"
    for k in ("tracer", "tensors_by_role", "params_by_role", "constrained_share", "times", "peak_rss_mb", "versions"):
        assert k in row
    big = S.check_job("torchvision", "vit_h_14", max_params=1_000_000)
    assert big["status"] == "skipped_size" and big["total_params"] > 1_000_000
    monkeypatch.setenv("NEROFY_WORKER_MAX_MB", "2000")  # 630M parameters need at least 7.6 GB
    big = S.check_job("torchvision", "vit_h_14", max_params=None)
    assert big["status"] == "oom" and big["error"].startswith("not run: needs at least") and "2.0 GB memory guard" in big["error"]
