"""``nerofy zoo --source transformers``: every config type of the installed transformers.

A type's model is built from its own default config (``nerofy.hf``): on the ``meta`` device at full
size for the structural row (real parameter counts, no memory), and shrunk for the numeric check
(``nerofy.hf.build``: the highest shrink level that builds and runs). Inputs come from the model
(``nerofy.example_inputs``), never from a table. Decoders get their causal-LM head (the LM head,
tied or not, is part of what a user trains); every other type its AutoModel class.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from nerofy import hf


@functools.lru_cache(maxsize=None)
def _mapping_has(mapping: str, model_type: str) -> bool:
    from transformers.models.auto import modeling_auto as MA

    return model_type in getattr(MA, mapping, {})


@functools.lru_cache(maxsize=None)
def head_for(model_type: str) -> str | None:
    """``causal_lm`` for decoder-only text types: a causal-LM class and no masked-LM, seq2seq or
    speech class, and a config that is neither encoder-decoder nor multimodal."""
    if not _mapping_has("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", model_type) or any(
            _mapping_has(m, model_type) for m in ("MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                                                  "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                                                  "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES")):
        return None
    try:
        config = hf.default_config(model_type)
    except Exception:  # noqa: BLE001
        return None
    subs = set(getattr(config, "sub_configs", {}) or {})
    if getattr(config, "is_encoder_decoder", False) or any(s.startswith(("vision", "audio")) for s in subs):
        return None
    return "causal_lm"


def task_of(model_type: str, config=None, cls=None) -> str:
    """The family a zoo row reports, from the class's main input and the config."""
    try:
        cls = cls or hf.model_class(model_type, head_for(model_type))
        config = config or hf.default_config(model_type)
    except Exception:  # noqa: BLE001 - a type that does not build still gets a row
        return "unknown"
    main = getattr(cls, "main_input_name", "input_ids")
    main = main[0] if isinstance(main, (list, tuple)) else main
    subs = set(getattr(config, "sub_configs", {}) or {})
    if any(s.startswith(("vision", "audio", "speech")) for s in subs) and any(s.startswith("text") for s in subs):
        return "multimodal"
    if main in ("input_values", "input_features", "audio_mel"):
        return "speech"
    if main == "pixel_values_videos" or (main == "pixel_values" and getattr(config, "num_frames", None)):
        return "video"
    if main in ("pixel_values",):
        return "vision"
    if main in ("past_values",):
        return "time-series"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if head_for(model_type):
        return "decoder"
    return "encoder" if main == "input_ids" else "other"


@dataclass(frozen=True)
class HFSpec:
    """A transformers config type as a zoo model (the fields of ``sources.ModelSpec`` it needs)."""
    name: str
    source: str = "transformers"

    @property
    def full_name(self) -> str:
        return f"{self.source}:{self.name}"

    @property
    def task(self) -> str:
        return task_of(self.name)

    def create(self, meta: bool = False) -> torch.nn.Module:
        """``meta=True``: the default (full-size) config on meta; else the shrunk model, random init."""
        if meta:
            return hf.build(self.name, "default", device="meta", head=head_for(self.name))[0]
        return hf.build(self.name, "small", head=head_for(self.name))[0]

    def build_small(self):
        return hf.build(self.name, "small", head=head_for(self.name))

    def inputs(self, batch: int = 2, seed: int = 0, model: torch.nn.Module | None = None) -> dict:
        return hf.example_inputs(model if model is not None else self.create(), batch=batch, seed=seed)

    def loss(self, out: Any) -> torch.Tensor:
        from nerofy.check import default_loss

        return default_loss(out)


PLAN_FOR_REAL_MAX = 60_000_000


def _shapes(inputs: dict) -> dict:
    return {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _unplaced(plan) -> list[str]:
    return [e.name for e in plan if e.role == "free" and e.frontend == ""]


def structural_job(name: str, stage: Callable[..., None] | None = None) -> dict:
    """The default config on meta with meta example inputs: plan (record trace) and rewrite there.
    A plan that no frontend traced and that leaves parameters without a rule is ``fail_trace``."""
    from . import jobs

    stage = stage or (lambda *a, **k: None)
    spec = HFSpec(name)
    row, src, t0 = jobs.start_row(spec.full_name, "structural", stage)
    row["source"] = "transformers"
    try:
        head = head_for(name)
        model, _ = hf.build(name, "default", device="meta", head=head)
        row["model_class"], row["family"] = type(model).__name__, task_of(name, model.config, type(model))
    except Exception as e:  # noqa: BLE001
        row["family"] = "unknown"
        row["status"], row["error"] = ("oom" if jobs.is_oom(e) else "fail_create"), jobs._err(e)
        return jobs._finish(row, t0, src)
    row["times"]["create"] = round(time.perf_counter() - t0, 4)
    row["total_params"] = sum(p.numel() for p in model.parameters())
    stage("counted", total_params=row["total_params"])
    try:
        inputs = hf.example_inputs(model)
        row["inputs"] = _shapes(inputs)
    except Exception as e:  # noqa: BLE001
        row["status"], row["error"] = "fail_create", "example inputs: " + jobs._err(e)
        return jobs._finish(row, t0, src)
    with hf.meta_values():  # masks and counts read on meta answer "all ones"
        row["status"] = jobs.structural(model, row, stage, plan_from=(model, inputs))
    if row["status"] == "fail_plan" and row["total_params"] <= PLAN_FOR_REAL_MAX:
        # a forward that reads values (.item(), boolean masks) cannot run on meta: a model this
        # small is planned from one real forward at its default size, and the plan applied on meta
        meta_error = row["error"]
        try:
            torch.manual_seed(0)
            real, _ = hf.build(name, "default", head=head)
            plan_from = (real, hf.example_inputs(real))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{meta_error} (and building it for real: {jobs._err(e)})"[:400]
            return jobs._finish(row, t0, src)
        row["error"] = ""
        row["status"] = jobs.structural(model, row, stage, plan_from=plan_from)
        row["note"] = f"meta forward failed ({meta_error[:120]}); planned from one real forward, rewritten on meta"
    if row["status"] == "pass" and row["tracer"] == "modules":
        import nerofy

        with hf.meta_values():
            plan = nerofy.plan(model, inputs)  # cheap again on meta: which parameters no rule placed
        if (left := _unplaced(plan)):
            failed = "; ".join(f"{f}: {m}" for f, m in plan.attempts if m != "ok" and f != "note")
            row["status"] = "fail_trace"
            row["error"] = (f"no frontend traced the model on meta ({failed}); {len(left)} parameters have no rule: "
                            f"{', '.join(left[:3])}")[:400]
    return jobs._finish(row, t0, src)


def check_job(name: str, stage: Callable[..., None] | None = None, *, steps: int = 3, verify: bool | str = True,
              max_params: int | None = 60_000_000, batch: int = 2, seed: int = 0) -> dict:
    """The full check (``nerofy.check.check_model``) of the type's shrunk model on its example inputs."""
    from nerofy.check import check_model

    from . import jobs

    stage = stage or (lambda *a, **k: None)
    spec = HFSpec(name)
    row, src, t0 = jobs.start_row(spec.full_name, "check", stage)
    row["source"] = "transformers"
    try:
        torch.manual_seed(seed)
        model, info = spec.build_small()
        row["model_class"] = info["class"]
        row["family"] = task_of(name, model.config, type(model))
        row["shrink_level"], row["shrink_tried"] = info["level"], info["tried"]
        inputs = hf.example_inputs(model, batch=batch, seed=seed)
        row["inputs"] = _shapes(inputs)
    except Exception as e:  # noqa: BLE001
        row["family"] = row.get("family") or "unknown"
        row["status"], row["error"] = ("oom" if jobs.is_oom(e) else "fail_create"), jobs._err(e)
        return jobs._finish(row, t0, src)
    row["times"]["create"] = round(time.perf_counter() - t0, 4)
    if jobs.too_big(row, model, max_params, stage):
        return jobs._finish(row, t0, src)
    model.train()
    stage("check")
    r = check_model(model, inputs, steps=steps, verify=verify, plan_inputs=inputs)
    jobs.fill_check_row(row, r, steps, batch, verify)
    return jobs._finish(row, t0, src)


__all__ = ["HFSpec", "head_for", "task_of", "structural_job", "check_job"]
