"""Models beyond timm for ``nerofy zoo --source torchvision|transformers``: name -> factory, example
inputs and loss. Nothing is downloaded: torchvision models are built with ``weights=None`` (and
``weights_backbone=None``); Hugging Face models are every config type of the installed
transformers, built from its default config (shrunk for the numeric check) with inputs
synthesised from the model (``nerofy.hf``, ``cli/hf_source.py``).

API (what ``nerofy zoo`` calls)::

    sources.SOURCES                         # ("torchvision", "transformers")
    sources.names(source)                   # every model name of that source, sorted
    spec = sources.get(source, name)        # a ModelSpec (KeyError with close matches if unknown)
    model = spec.create(meta=False)         # nn.Module, random init (meta=True: on the meta device)
    inputs = spec.inputs(batch=2, seed=0)   # a tuple: model(*inputs)
    loss = spec.loss(model(*inputs))        # a scalar to backpropagate
    row = sources.check_job(source, name, steps=3, verify=True, max_params=60e6)   # a zoo row

``check_job`` returns the same row fields as ``cli.jobs.check_job`` (``name`` is
``"<source>:<name>"``, ``family`` the task: classification / detection / segmentation / video /
optical_flow / quantizable / encoder / decoder / encoder-decoder / vision / speech), so the report and expected.json treat it like a timm row.
Nothing here prints.
"""
from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

SOURCES = ("torchvision", "transformers")


def _default_loss(out: Any) -> torch.Tensor:
    from nerofy.check import default_loss

    return default_loss(out)


def _sum_losses(out: Any) -> torch.Tensor:
    """torchvision detection models in train mode return a dict of losses."""
    if isinstance(out, dict) and out and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values()):
        return sum(out.values())
    return _default_loss(out)


@dataclass(frozen=True)
class ModelSpec:
    source: str
    name: str
    task: str
    factory: Callable[[], nn.Module] = field(repr=False)
    make_inputs: Callable[[int, torch.Generator], tuple] = field(repr=False)
    loss: Callable[[Any], torch.Tensor] = field(default=_default_loss, repr=False)

    @property
    def full_name(self) -> str:
        return f"{self.source}:{self.name}"

    def create(self, meta: bool = False) -> nn.Module:
        if meta:
            try:
                with torch.device("meta"):
                    return self.factory()
            except NotImplementedError:
                # a constructor that reads tensor values (torchvision's RegNet widths) cannot run on
                # meta: build it for real once, then drop the storage
                return self.factory().to("meta")
        return self.factory()

    def inputs(self, batch: int = 2, seed: int = 0) -> tuple:
        return self.make_inputs(batch, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------
_TV_IMAGE = 64
# classification models that need another input size or a constructor argument at small sizes
# maxvit: multiples of 7 * 32 only; inception_v3's train-mode aux head needs its 299 px
_TV_SIZE = {"inception_v3": 299, "vit_h_14": 56, "maxvit_t": 224}
_TV_KW = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 64},
          "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 56},
          "inception_v3": {"init_weights": True}, "googlenet": {"init_weights": True}}
_DET_SIZE = 128
# video clips (frames, px): MViT's position embeddings want its 16 x 224 clips; S3D's last pooling a
# 7 x 7 map (224 px)
_VIDEO_SIZE = {"mvi": (16, 224), "s3d": (16, 224)}
_FLOW_SIZE = 128  # RAFT's correlation pyramid needs feature maps of at least 16 px (128 / 8)


def _tv():
    import torchvision

    return torchvision


def _images(c: int, s: int):
    return lambda b, g: (torch.randn(b, c, s, s, generator=g),)


def _clips(t: int, s: int):
    return lambda b, g: (torch.randn(b, 3, t, s, s, generator=g),)


def _frame_pairs(s: int):
    return lambda b, g: (torch.randn(b, 3, s, s, generator=g), torch.randn(b, 3, s, s, generator=g))


def _det_inputs(name: str):
    def make(b, g):
        imgs, targets = [], []
        for _ in range(b):
            imgs.append(torch.rand(3, _DET_SIZE, _DET_SIZE, generator=g))
            xy = torch.rand(2, 2, generator=g) * (_DET_SIZE / 2)
            boxes = torch.cat([xy, xy + 16 + torch.rand(2, 2, generator=g) * (_DET_SIZE / 2 - 16)], 1)
            # keypoint R-CNN has 2 classes (background, person): labels must stay below 2
            hi = 2 if name.startswith("keypointrcnn") else 3
            t = {"boxes": boxes, "labels": torch.randint(1, hi, (2,), generator=g)}
            if name.startswith("maskrcnn"):
                t["masks"] = torch.zeros(2, _DET_SIZE, _DET_SIZE, dtype=torch.uint8)
                for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                    t["masks"][i, y0:y1, x0:x1] = 1
            if name.startswith("keypointrcnn"):
                kp = boxes[:, None, :2] + torch.rand(2, 17, 2, generator=g) * 16
                t["keypoints"] = torch.cat([kp, torch.ones(2, 17, 1)], 2)
            targets.append(t)
        return imgs, targets
    return make


def _tv_specs() -> dict[str, ModelSpec]:
    tv = _tv()
    M = tv.models
    out: dict[str, ModelSpec] = {}
    for name in M.list_models(module=M):
        kw = dict(_TV_KW.get(name, {}))
        out[name] = ModelSpec("torchvision", name, "classification",
                              lambda n=name, kw=kw: M.get_model(n, weights=None, num_classes=10, **kw),
                              _images(3, _TV_SIZE.get(name, _TV_IMAGE)))
    for name in M.list_models(module=M.detection):
        kw: dict = {"weights": None, "weights_backbone": None, "num_classes": 3}
        if not name.startswith("ssd"):
            kw.update(min_size=_DET_SIZE, max_size=_DET_SIZE)
        if name.startswith("keypointrcnn"):
            kw["num_classes"] = 2
        out[name] = ModelSpec("torchvision", name, "detection", lambda n=name, kw=kw: M.get_model(n, **kw),
                              _det_inputs(name), _sum_losses)
    for name in M.list_models(module=M.segmentation):
        out[name] = ModelSpec("torchvision", name, "segmentation",
                              lambda n=name: M.get_model(n, weights=None, weights_backbone=None, num_classes=3),
                              _images(3, _TV_IMAGE))
    for name in M.list_models(module=M.video):
        out[name] = ModelSpec("torchvision", name, "video", lambda n=name: M.get_model(n, weights=None, num_classes=5),
                              _clips(*_VIDEO_SIZE.get(name[:3], (8, _TV_IMAGE))))
    for name in M.list_models(module=M.optical_flow):
        out[name] = ModelSpec("torchvision", name, "optical_flow", lambda n=name: M.get_model(n, weights=None),
                              _frame_pairs(_FLOW_SIZE))
    for name in M.list_models(module=M.quantization):
        # the float, quantization-ready variant (QuantStub, FloatFunctional): what quantization-aware
        # training trains
        kw = dict(_TV_KW.get(name.removeprefix("quantized_"), {}))
        out[name] = ModelSpec("torchvision", name, "quantizable",
                              lambda n=name, kw=kw: M.get_model(n, weights=None, quantize=False, num_classes=10, **kw),
                              _images(3, _TV_SIZE.get(name.removeprefix("quantized_"), _TV_IMAGE)))
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers: every config type, built from its own config (cli/hf_source.py)
# ---------------------------------------------------------------------------------------------
def _hf_specs() -> dict:
    from nerofy import hf

    from .hf_source import HFSpec

    return {t: HFSpec(t) for t in hf.model_types()}


_CACHE: dict[str, dict[str, ModelSpec]] = {}


def specs(source: str) -> dict[str, ModelSpec]:
    if source not in SOURCES:
        raise KeyError(f"unknown source {source!r}; choose from {', '.join(SOURCES)} (or timm)")
    if source not in _CACHE:
        _CACHE[source] = _tv_specs() if source == "torchvision" else _hf_specs()
    return _CACHE[source]


def names(source: str) -> list[str]:
    return sorted(specs(source))


def get(source: str, name: str) -> ModelSpec:
    if ":" in name and name.split(":", 1)[0] in SOURCES:
        source, name = name.split(":", 1)
    s = specs(source)
    if name not in s:
        close = difflib.get_close_matches(name, list(s), n=3)
        raise KeyError(f"no {source} model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return s[name]


# ---------------------------------------------------------------------------------------------
# one zoo row
# ---------------------------------------------------------------------------------------------
def check_job(source: str, name: str, stage: Callable[..., None] | None = None, *, steps: int = 3,
              verify: bool | str = True, max_params: int | None = 60_000_000, batch: int = 2, seed: int = 0) -> dict:
    """The full check of one model as a zoo row (the fields of ``cli.jobs.check_job``)."""
    from nerofy.check import check_model

    from . import jobs

    if source == "transformers" or name.startswith("transformers:"):
        from . import hf_source

        return hf_source.check_job(name.removeprefix("transformers:"), stage, steps=steps, verify=verify,
                                   max_params=max_params, batch=batch, seed=seed)
    stage = stage or (lambda *a, **k: None)
    spec = get(source, name)
    row, src, t0 = jobs.start_row(spec.full_name, "check", stage)
    row["family"], row["source"] = spec.task, source
    try:  # count on meta first: a model over max_params is never built for real
        n = sum(p.numel() for p in spec.create(meta=True).parameters())
    except Exception:
        n = None
    if n is not None and max_params and n > max_params:
        row["total_params"], row["status"] = n, "skipped_size"
        row["error"] = f"{n / 1e6:.1f}M parameters > --max-params {max_params / 1e6:.0f}M"
        return jobs._finish(row, t0, src)
    if n is not None and (no_fit := jobs.cannot_fit(n, row["base_rss_mb"])):
        row["total_params"], row["status"], row["error"] = n, "oom", no_fit
        return jobs._finish(row, t0, src)
    try:
        torch.manual_seed(seed)
        model = spec.create()
        inputs = spec.inputs(batch, seed)
    except Exception as e:
        row["status"], row["error"] = ("oom" if jobs.is_oom(e) else "fail_create"), jobs._err(e)
        return jobs._finish(row, t0, src)
    row["times"]["create"] = round(time.perf_counter() - t0, 4)
    if jobs.too_big(row, model, max_params, stage):
        return jobs._finish(row, t0, src)
    stage("check")
    r = check_model(model, inputs, steps=steps, verify=verify, loss_fn=spec.loss,
                    plan_inputs=inputs)
    if jobs.needs_batch_2(batch, r.error):
        del model, inputs, r
        jobs.release_memory()
        return jobs.batch_2_row(check_job(source, name, stage, steps=steps, verify=verify, max_params=max_params,
                                          batch=2, seed=seed))
    jobs.fill_check_row(row, r, steps, batch, verify)
    return jobs._finish(row, t0, src)


def structural_job(source: str, name: str, stage: Callable[..., None] | None = None) -> dict:
    """Trace + plan + rewrite on the meta device, as a zoo row (the fields of ``jobs.structural_job``)."""
    from . import jobs

    if source == "transformers" or name.startswith("transformers:"):
        from . import hf_source

        return hf_source.structural_job(name.removeprefix("transformers:"), stage)
    stage = stage or (lambda *a, **k: None)
    spec = get(source, name)
    row, src, t0 = jobs.start_row(spec.full_name, "structural", stage)
    row["family"], row["source"] = spec.task, source
    try:
        model = spec.create(meta=True)
    except Exception as e:
        row["status"], row["error"] = ("oom" if jobs.is_oom(e) else "fail_create"), jobs._err(e)
        return jobs._finish(row, t0, src)
    row["times"]["create"] = round(time.perf_counter() - t0, 4)
    row["total_params"] = sum(p.numel() for p in model.parameters())
    stage("counted", total_params=row["total_params"])
    if row["total_params"] <= PLAN_FOR_REAL_MAX:
        # Hugging Face models and detectors do not trace on meta (data-dependent control flow,
        # .item()): small ones are planned from one real forward of their example inputs, and the
        # plan is applied on meta as for every other model
        torch.manual_seed(0)
        plan_from = (spec.create(), spec.inputs(2, 0))
        row["note"] = "planned from one real forward of the example inputs; rewritten on meta"
    else:  # bigger ones trace on meta with the example inputs' shapes (torchvision models declare no input size)
        from nerofy.trace import to_meta

        plan_from = (model, to_meta(spec.inputs(2, 0)))
    row["status"] = jobs.structural(model, row, stage, plan_from=plan_from)
    return jobs._finish(row, t0, src)


PLAN_FOR_REAL_MAX = 60_000_000


__all__ = ["SOURCES", "ModelSpec", "specs", "names", "get", "check_job", "structural_job"]
