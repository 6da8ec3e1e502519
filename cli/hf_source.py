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
    """Parameters no frontend and no module rule placed. Planned again after the rewrite, a
    parameter the first plan constrained sits under ``parametrizations.``: it was placed."""
    return [e.name for e in plan if e.role == "free" and e.frontend == "" and ".parametrizations." not in e.name]


def build_error(model_type: str, head: str | None, e: BaseException) -> str:
    """A row's reason for a type that does not build: nerofy's own reasons (no model class, a
    missing package) as they are; an error raised inside transformers' modelling code while it
    builds the default config is transformers' own, and the row says so, with the line."""
    import traceback

    from . import jobs

    msg = jobs._err(e)
    if isinstance(e, (LookupError, ImportError)) and not isinstance(e, KeyError):
        return msg
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/transformers/" in f.filename.replace("\\", "/")]
    if not frames:
        return msg
    f = frames[-1]
    where = f.filename.replace("\\", "/").split("/transformers/", 1)[1]
    try:
        cls = hf.model_class(model_type, head).__name__
    except Exception:  # noqa: BLE001
        cls = model_type
    return (f"transformers cannot build {cls} from its own default config ({model_type}): {msg} "
            f"(transformers/{where}:{f.lineno})")[:jobs.MAX_ERROR]


def _plan_without_forward(model, row: dict, stage: Callable[..., None]) -> dict:
    """A model class with no forward of its own (a container of sub-models called one by one, a
    VQ tokenizer used through encode/decode): nothing to trace, so the plan comes from module
    rules alone (``plan_from`` says so); a parameter no rule places makes it ``fail_trace``."""
    import nerofy

    from . import jobs

    row["plan_from"] = "modules (no forward)"
    row["status"] = jobs.structural(model, row, stage)
    if row["status"] == "pass":
        left = _unplaced(nerofy.plan(model))
        if left:
            row["status"] = "fail_trace"
            row["error"] = (f"{type(model).__name__} has no forward to trace, and {len(left)} parameters have no "
                            f"module rule: {', '.join(left[:3])}")[:400]
    return row


def _plan_for_real(name: str, head: str | None, model, row: dict, stage: Callable[..., None]) -> None:
    """The meta forward failed (a forward that reads values: ``.tolist()``, ``nonzero``, a CPU
    tensor made inside forward). Plan from one real CPU forward instead, and say so in the row
    (``plan_from``, ``meta_error``):

    - ``"real"``: the default config built for real (up to ``PLAN_FOR_REAL_MAX`` parameters): the
      same parameters, so the plan is applied to the full-size model on meta;
    - ``"small"``: else the shrunk config (``hf.build(size="small")``, the level that builds and
      runs): the plan and the rewrite are the small model's (``small_params``, ``shrink_level``;
      ``params_by_role`` / ``tensors_by_role`` count the small model), ``total_params`` stays the
      full-size count from meta.

    Where neither runs, the row keeps ``fail_plan`` with every error."""
    from . import jobs

    total = row["total_params"]
    meta_error = row["error"]
    row["meta_error"] = meta_error
    errors = [f"meta: {meta_error}"]
    if total <= PLAN_FOR_REAL_MAX:
        try:
            torch.manual_seed(0)
            real, _ = hf.build(name, "default", head=head)
            plan_from = (real, hf.example_inputs(real))
        except Exception as e:  # noqa: BLE001
            errors.append(f"real default build: {jobs._err(e)}")
        else:
            row["error"], row["inputs"] = "", _shapes(plan_from[1])
            row["status"] = jobs.structural(model, row, stage, plan_from=plan_from)
            row["total_params"] = total
            if row["status"] == "pass":
                row["plan_from"] = "real"
                return
            errors.append(f"real default forward: {row['error']}")
    try:
        torch.manual_seed(0)
        small, info = hf.build(name, "small", head=head)
    except Exception as e:  # noqa: BLE001
        errors.append(f"small build: {jobs._err(e)}")
    else:
        small_inputs = info["inputs"] or hf.example_inputs(small)  # the probe's: its layouts already tried
        row["error"], row["inputs"] = "", _shapes(small_inputs)
        row["status"] = jobs.structural(small, row, stage, plan_from=(small, small_inputs))
        row["small_params"], row["shrink_level"] = row["total_params"], info["level"]
        row["total_params"] = total
        if row["status"] == "pass":
            row["plan_from"] = "small"
            return
        errors.append(f"small forward: {row['error']}")
    row["status"] = "fail_plan"
    row["error"] = "; ".join(errors)[:600]


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
        model, info = hf.build(name, "default", device="meta", head=head)
        row["model_class"], row["family"] = type(model).__name__, task_of(name, model.config, type(model))
        if info["assigned"]:  # placeholder ids the default config declares but leaves unset
            row["config_assigned"] = info["assigned"]
    except Exception as e:  # noqa: BLE001
        row["family"] = "unknown"
        row["status"], row["error"] = ("oom" if jobs.is_oom(e) else "fail_create"), build_error(name, head, e)
        return jobs._finish(row, t0, src)
    row["times"]["create"] = round(time.perf_counter() - t0, 4)
    row["total_params"] = sum(p.numel() for p in model.parameters())
    stage("counted", total_params=row["total_params"])
    if type(model).forward is torch.nn.Module.forward:
        return jobs._finish(_plan_without_forward(model, row, stage), t0, src)
    try:
        layouts = hf.iter_layouts(model)  # the first; the others only where it does not fit (below)
        inputs = next(layouts)
        row["inputs"] = _shapes(inputs)
    except Exception as e:  # noqa: BLE001 - the model builds: a failure to plan it, not to create it
        row["status"], row["error"] = "fail_plan", "example inputs: " + jobs._err(e)
        return jobs._finish(row, t0, src)
    with hf.meta_values():  # masks and counts read on meta answer "all ones"
        row["status"] = jobs.structural(model, row, stage, plan_from=(model, inputs))
        # another layout helps where the inputs did not fit, not where meta cannot run the model
        # (an op with no meta kernel, a value read: NotImplementedError); that case goes to the real
        # builds below, at once
        if row["status"] == "fail_plan" and "NotImplementedError" not in row["error"]:
            first_error = row["error"]
            for alt in layouts:
                row["error"] = ""
                row["status"] = jobs.structural(model, row, stage, plan_from=(model, alt))
                if row["status"] == "pass":
                    inputs, row["inputs"] = alt, _shapes(alt)
                    break
            else:
                row["error"] = first_error
    row["plan_from"] = "meta"
    if row["status"] == "fail_plan" and row.get("config_assigned"):
        # the placeholder ids given to the default config made the model ask for more than the
        # inputs have: the default config as it is, with that tower unused (the row says so)
        first_error = row["error"]
        for k in row["config_assigned"]:
            setattr(model.config, k, None)
        inputs = hf.example_inputs(model)
        with hf.meta_values():
            row["error"] = ""
            row["status"] = jobs.structural(model, row, stage, plan_from=(model, inputs))
        if row["status"] == "pass":
            row["inputs"] = _shapes(inputs)
            row["note"] = f"planned with the default config's unset placeholder ids ({first_error[:120]})"
            row.pop("config_assigned")
        else:
            row["error"] = first_error
    if row["status"] == "fail_plan":
        _plan_for_real(name, head, model, row, stage)
    if row["status"] == "pass" and row["tracer"] == "modules" and row["plan_from"] == "meta":
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
        row["shrink_layer_kinds"] = info["layer_kinds"]  # False: the first layers (every kind failed: shrink_tried)
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
