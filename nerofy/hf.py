"""Hugging Face transformers from nothing but the installed library: the model class of any config
type, a small config from any config, and example inputs from any model.

    model = nerofy.hf.build("llava", size="small")     # shrunk config, random weights
    inputs = nerofy.example_inputs(model)              # a dict: model(**inputs)
    plan = nerofy.plan(model, inputs)

transformers is imported lazily (here, inside functions): ``import nerofy`` never pays for it.
Nothing is downloaded. Rules are data (``SHRINK_RULES``, ``INPUT_RULES``); the functions walk them.
"""
from __future__ import annotations

import contextlib
import difflib
import fractions
import functools
import importlib.util
import inspect
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["model_types", "model_class", "default_config", "shrink_config", "build", "example_inputs",
           "input_layouts", "iter_layouts", "meta_values", "SHRINK_RULES", "INPUT_RULES"]


def _tf():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is in the dev extra
        raise ImportError("nerofy.hf needs transformers: pip install transformers") from e
    return transformers


# ---------------------------------------------------------------------------------------------
# config type -> model class
# ---------------------------------------------------------------------------------------------
# Where a type has no AutoModel (MODEL_MAPPING) entry, the first task mapping that has it gives the
# class; the base model of a mapping is preferred over heads, so the order is "closest to a bare model".
_MAPPING_ORDER = ("MODEL_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
                  "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_BACKBONE_MAPPING_NAMES",
                  "MODEL_FOR_PRETRAINING_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                  "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                  "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES",
                  "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES")


def model_types() -> list[str]:
    """Every config type the installed transformers registers (``CONFIG_MAPPING``), sorted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def _check_type(model_type: str) -> None:
    types = model_types()
    if model_type not in types:
        near = difflib.get_close_matches(model_type, types, n=3)
        raise KeyError(f"transformers has no config type {model_type!r}"
                       + (f"; did you mean {', '.join(near)}?" if near else "; see nerofy.hf.model_types()"))


_HEADS = {"causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"}


def model_class(model_type: str, head: str | None = None) -> type:
    """The model class to build for a config type: AutoModel's, else the first task mapping's
    (``_MAPPING_ORDER``), else ``<Name>Model`` beside ``<Name>Config`` (sub-configs such as
    ``clip_vision_model`` have no auto entry but a class of their own). ``head="causal_lm"``
    prefers ``AutoModelForCausalLM``'s class (an LM head, tied or not) where the type has one.
    LookupError says why there is none."""
    _check_type(model_type)
    tf = _tf()
    from transformers.models.auto import modeling_auto as MA
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if head is not None and head not in _HEADS:
        raise ValueError(f"head must be one of {', '.join(_HEADS)} or None, got {head!r}")
    for mapping in ((_HEADS[head],) if head else ()) + _MAPPING_ORDER:
        name = getattr(MA, mapping, {}).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        if name:
            cls = getattr(tf, name, None)
            if cls is None:
                raise LookupError(f"{mapping} names {name} for {model_type!r}, which transformers does not export")
            return cls
    cfg_name = CONFIG_MAPPING_NAMES[model_type]
    for cand in (cfg_name.removesuffix("Config") + "Model", cfg_name.removesuffix("Config")):
        cls = getattr(tf, cand, None)
        if isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel):
            return cls
    raise LookupError(f"no model class for config type {model_type!r}: no auto mapping lists it and transformers "
                      f"exports no {cfg_name.removesuffix('Config')}Model (a config-only type)")


def default_config(model_type: str):
    """``AutoConfig.for_model(model_type)``: the type's default (full-size) config."""
    _check_type(model_type)
    return _tf().AutoConfig.for_model(model_type)


# ---------------------------------------------------------------------------------------------
# small configs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """Keys matching ``pattern`` (whole key) are capped at ``cap`` from shrink level ``level`` up.
    ``cap`` is a number (ints; list entries each capped), or a function (value, i) -> new value."""
    pattern: str
    cap: Any
    level: int = 1
    whole: bool = False  # cap takes the whole list
    alt: Any = None  # the cap to try where the config class rejects ``cap`` (its validators tie keys)



def _stage_width(v: int, i: int) -> int:
    # stage widths double per stage; multiples of 32 keep GroupNorm(32) and head splits valid
    return min(v, 32 * 2 ** min(i, 2))


# Level 1 shrinks depth, widths, heads, experts and the vocabulary; level 2 also image sizes,
# per-stage lists and convolution widths. A model that does not build or run at one level is tried
# at the next lower one (build()).
_DEPTH = (r"num_hidden_layers|num_layers|n_layers?|(en|de)coder_layers|num_(en|de)coder_layers|num_.+_layers|.+_num_layers"
          r"|num_blocks|depth")
# layers that reuse an earlier layer's key/value cache: the layers below them must hold every layer
# type (gemma3n checks it), which a 2-layer model cannot, so the small model shares none
_KV_SHARED = r"num_kv_shared_layers|num_shared_kv_layers|.+_kv_shared_layers"
_KV_HEADS = r"num_key_value_heads|num_kv_heads|n_kv_heads|.+_key_value_heads|.+_key_value_heads_per_layer"
_HEAD_COUNT = (r"num_attention_heads|n_heads?|num_heads|(en|de)coder_attention_heads|num_.+_heads|.+_attention_heads"
               r"|.+_n_heads")
SHRINK_RULES: tuple[Rule, ...] = (
    Rule(_KV_SHARED, 0, 0),
    # depth (a floor of 2 keeps "every other layer" patterns and the last-but-one feature layer)
    Rule(_DEPTH, 2, 0),
    Rule(r"num_experts|num_local_experts|n_routed_experts|moe_num_experts", 4, 0),
    Rule(r"num_experts_per_tok|num_experts_per_token|moe_topk|num_selected_experts|top_k|moe_k", 2, 0),
    Rule(r"n_group|num_expert_group|topk_group|n_shared_experts", 1, 0),
    # widths: hidden 32 = 2 heads x 16
    Rule(r"hidden_size|d_model|n_embd|embed_dim|dim|word_embed_proj_dim|embedding_size|projection_dim|proj_dim"
         r"|text_embed_dim|vision_embed_dim|d_latents|.+_hidden_size|output_dim", 32),
    # key/value heads before the head counts (num_.+_heads would match them): 2 heads, 1 kv head (GQA)
    Rule(_KV_HEADS, 1, alt=2),  # alt: as many as heads
    Rule(_HEAD_COUNT, 2),
    Rule(r"head_dim|d_kv|attention_head_size|d_head|qk_rope_head_dim|qk_nope_head_dim|v_head_dim|kv_lora_rank"
         r"|q_lora_rank|rotary_dim", 16),
    Rule(r"intermediate_size|ffn_dim|d_ff|d_inner|dff|n_inner|hidden_dim|.+_ffn_dim|.+_intermediate_size"
         r"|mlp_dim|.+_mlp_dim", 64),
    # Fourier position features: sin and cos of num_pos_feats frequencies make a width (SAM's 128 x 2 = 256)
    Rule(r"num_pos_feats", 16),
    Rule(r"max_position_embeddings|n_positions|n_ctx|max_seq_len|max_sequence_length", 512),
    # encoder frames / decoder positions of speech seq2seq (whisper's encoder takes exactly 2 x source)
    Rule(r"max_source_positions|max_target_positions", 64),
    # level 2: what changes shapes beyond widths
    Rule(r"depths", lambda v, i: 1, 2),
    Rule(r"hidden_sizes|embed_dims|dims|channels|neck_hidden_sizes|conv_dim", _stage_width, 2),
    # Hiera (SAM2) pools its residual only where a stage's width changes: every stage doubles
    Rule(r"embed_dim_per_stage", lambda v, i: min(v, 32 * 2 ** i), 2),
    Rule(r"num_attention_heads|num_heads", lambda v, i: 1, 2),  # per-stage head lists (ints went above)
    Rule(r"image_size|img_size|input_size|crop_size", 64, 2),
)
_TOKEN_KEY = re.compile(r".*_token_(id|index)s?$|.*_token$")


def _token_ids(d: dict) -> list[int]:
    out = []
    for k, v in d.items():
        if not isinstance(k, str):  # id2label's keys
            continue
        if _TOKEN_KEY.match(k):
            vals = v if isinstance(v, (list, tuple)) else [v]
            out += [x for x in vals if isinstance(x, int) and not isinstance(x, bool)]
        elif isinstance(v, dict):
            out += _token_ids(v)
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _new_value(key: str, v, level: int, alt: bool = False):
    """``v`` after the first rule that matches ``key`` at this level and fits the value's kind."""
    for rule in SHRINK_RULES:
        if rule.level > level or not re.fullmatch(rule.pattern, key):
            continue
        if _is_int(v) and not callable(rule.cap):
            cap = rule.alt if alt and rule.alt is not None else rule.cap
            return min(v, cap) if v > 0 else v
        if rule.whole and isinstance(v, (list, tuple)) and v and all(_is_int(x) for x in v):
            return type(v)(rule.cap(list(v)))
        if isinstance(v, (list, tuple)) and v and all(_is_int(x) for x in v) and (callable(rule.cap) or level >= 2):
            cap = rule.cap if callable(rule.cap) else (lambda x, i, m=rule.cap: min(x, m))
            return type(v)(cap(x, i) if x > 0 else x for i, x in enumerate(v))
    return v


def _shrink_dict(d: dict, level: int, max_token: int, alt: bool = False, kinds: bool = True) -> dict:
    out = {}
    depth: dict[int, int] = {}
    # a count of stages (swin's num_layers = len(depths)) is not a depth: it stays
    stages = {len(v) for k, v in d.items() if k in ("depths", "hidden_sizes", "embed_dims") and isinstance(v, list)}
    for k, v in d.items():
        if not isinstance(k, str) or k in ("id2label", "label2id"):
            out[k] = v
        elif isinstance(v, dict):
            out[k] = _shrink_dict(v, level, max_token, alt, kinds)
        elif k == "vocab_size" and _is_int(v):
            # special ids (image tokens at 151655...) must index the table: some default configs
            # put them one past it (llava: 32000 of 32000), which only a checkpoint's resize fixes
            out[k] = max(min(v, 256) if level >= 1 else v, max_token + 1)
        else:
            out[k] = v if (_is_int(v) and v in stages and re.fullmatch(_DEPTH, k)) else _new_value(k, v, level, alt)
            if _is_int(v) and out[k] != v and re.fullmatch(_DEPTH, k) and not re.fullmatch(_KV_SHARED, k):
                depth[v] = out[k]
    for old, new in list(depth.items()):  # a backbone keeps a layer per stage it outputs
        need = min(old, len(set(_backbone_outputs(d, old) or ())))
        if need > new:
            depth[old] = need
            for k in out:
                if _is_int(d.get(k)) and d[k] == old and out[k] == new and re.fullmatch(_DEPTH, k):
                    out[k] = need
    # lists with one entry per layer (layer_types, per-layer windows) follow the new depth, and so do
    # dicts keyed by layer index (per_layer_config: {5: {...}, 11: {...}})
    for old, new in depth.items():
        lists = [k for k, v in out.items() if isinstance(v, list) and len(v) == old and k != "depths"]
        keep = _kept_layers([out[k] for k in lists], new) if kinds else list(range(new))
        for k in lists:
            out[k] = [out[k][i] for i in keep]
        for k, v in out.items():
            if isinstance(v, dict) and v and all(_layer_index(i) is not None for i in v) \
                    and max(_layer_index(i) for i in v) < old:
                out[k] = {i: x for i, x in v.items() if _layer_index(i) < new}
        _fit_backbone_stages(out, old, new)
    _fit_layer_ids(d, out)
    _fit_pinpoints(d, out)
    if level >= 1:
        _fit_mrope_dict(out)
    return out


# a model's keys that list layers of the encoders in its sub-configs (DepthPro's intermediate_hook_ids
# = (11, 5): the patch encoder's hidden states it fuses)
_LAYER_IDS = r"(.+_)?hook_ids|intermediate_layers_indices|cross_attention_layers"
# of those, the ones that pick the layers of one kind (Mllama's cross-attention layers among its
# self-attention ones) rather than list features (as many as before, repeats allowed)
_LAYER_SETS = r"cross_attention_layers"


def _fit_pinpoints(d: dict, out: dict) -> None:
    """LLaVA-NeXT's any-resolution grid (``image_grid_pinpoints``, in pixels: whole tiles of the
    vision tower's image size) scales with the tower's shrunk image size."""
    pins = d.get("image_grid_pinpoints")
    v, w = d.get("vision_config"), out.get("vision_config")
    if not (isinstance(pins, list) and pins and all(isinstance(p, list) and all(map(_is_int, p)) for p in pins)
            and isinstance(v, dict) and isinstance(w, dict)):
        return
    old, new = v.get("image_size"), w.get("image_size")
    if _is_int(old) and _is_int(new) and 0 < new < old:
        out["image_grid_pinpoints"] = [[max(1, x * new // old) for x in p] for p in pins]


def _fit_layer_ids(d: dict, out: dict) -> None:
    """Layer ids into the layers of this config (Mllama's ``intermediate_layers_indices``) or of its
    sub-configs whose depth shrank move to the same relative depth."""
    def changed(a, b):  # the depth that shrank: num_hidden_layers where several did (Mllama's global layers)
        got = {k: (a[k], b[k]) for k in a if isinstance(k, str) and re.fullmatch(_DEPTH, k)
               and _is_int(a[k]) and _is_int(b.get(k)) and b[k] != a[k]}
        return {got["num_hidden_layers"]} if "num_hidden_layers" in got else set(got.values())

    pairs = changed(d, out) or {p for c, v in d.items() if isinstance(v, dict) and isinstance(out.get(c), dict)
                                for p in changed(v, out[c])}
    if len(pairs) != 1:
        return
    (old, new), = pairs
    for k, v in d.items():
        if isinstance(k, str) and re.fullmatch(_LAYER_IDS, k) and isinstance(v, (list, tuple)) and v \
                and all(_is_int(i) and 0 <= i < old for i in v):
            fit = [j - 1 for j in _rescale_indices([i + 1 for i in v], old, new, low=1)]
            if re.fullmatch(_LAYER_SETS, k):  # the layers of one kind: each once, and never all of them
                fit = sorted(set(fit))
                if len(fit) == new and len(set(v)) < old:
                    fit = fit[1:]
            out[k] = type(v)(fit)


def _backbone_outputs(d: dict, old: int) -> list[int] | None:
    """The stages (non-negative indices) that a backbone with a stage per layer (``stage_names``:
    "stem" + one per layer, as transformers' backbone configs make them) outputs, else None."""
    names = d.get("stage_names")
    if not (isinstance(names, list) and len(names) == old + 1):
        return None
    idx = d.get("out_indices")
    if isinstance(idx, (list, tuple)) and all(_is_int(i) for i in idx):
        return [i for i in idx if i >= 0]
    feats = d.get("out_features")
    return [names.index(f) for f in feats if f in names] if isinstance(feats, list) else []


def _rescale_indices(vals: list[int], old: int, new: int, low: int = 0) -> list[int]:
    """Indices into ``old`` layers moved to the same relative depth of ``new`` (within [low, new]);
    where two would meet, the last ones in the same order, so that as many distinct ones remain."""
    out = [min(max(round(i * new / old), low), new) for i in vals]
    if len(set(out)) < len(set(vals)) <= new - low + 1:
        rank = {v: r for r, v in enumerate(sorted(set(vals)))}
        out = [new - len(rank) + 1 + rank[v] for v in vals]
    return out


def _fit_backbone_stages(d: dict, old: int, new: int) -> None:
    """A backbone keeps its first ``new`` stages and outputs as many as before, at the same relative
    depths (a DPT neck reads one feature map per ``neck_hidden_sizes`` entry); ``_shrink_dict``
    keeps enough layers for them."""
    outs = _backbone_outputs(d, old)
    if outs is None:
        return
    names = d["stage_names"]
    fit = dict(zip(outs, _rescale_indices(outs, old, new, low=1)))
    d["stage_names"] = names[:new + 1]
    idx = d.get("out_indices")
    if isinstance(idx, (list, tuple)) and all(_is_int(i) for i in idx):
        d["out_indices"] = type(idx)(fit.get(i, i) for i in idx)
    if isinstance(d.get("out_features"), list):
        d["out_features"] = [d["stage_names"][fit[names.index(f)]] if f in names and names.index(f) in fit else f
                             for f in d["out_features"]]


def _kept_layers(lists: list[list], new: int) -> list[int]:
    """Which ``new`` of the layers the per-layer ``lists`` describe a shrunk model keeps: the first
    layer of each kind (each distinct entry of a list of names, ``layer_types``' "full_attention"
    after four "sliding_attention"), then the earliest others, in layer order; the same layers
    for every list, so that they stay aligned. A cut to the first ``new`` layers would drop every
    kind that first appears later (a 2-layer model of all-sliding layers)."""
    old = len(lists[0]) if lists else 0
    first: dict = {}
    for j, v in enumerate(lists):
        if all(isinstance(x, str) for x in v):
            for i, x in enumerate(v):
                first.setdefault((j, x), i)
    keep = sorted(set(first.values()))[:new]
    keep += [i for i in range(old) if i not in keep][:new - len(keep)]
    return sorted(keep)


def _layer_index(k) -> int | None:
    if _is_int(k):
        return k
    return int(k) if isinstance(k, str) and k.isdigit() else None


def _mrope_target(head_dim: int, partial: float) -> int:
    return int(head_dim * partial) // 2


def _fit_sections(sec: list, target: int) -> list:
    total = sum(sec)
    new = [max(1, target * x // total) for x in sec]
    new[-1] += target - sum(new)
    return new


def _fit_mrope_dict(d: dict) -> None:
    """Multimodal RoPE sections (t, h, w) in a config's rope_parameters must sum to half the
    rotary width (head_dim x partial_rotary_factor): refit them to the shrunk head_dim."""
    rope = d.get("rope_parameters")
    if not isinstance(rope, dict) or not isinstance(rope.get("mrope_section"), list) or not rope["mrope_section"]:
        return
    heads = d.get("num_attention_heads")
    hd = d.get("head_dim") or (d["hidden_size"] // heads if d.get("hidden_size") and heads else None)
    if not _is_int(hd):
        return
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0
    target = _mrope_target(hd, partial)
    if target >= len(rope["mrope_section"]) and sum(rope["mrope_section"]) != target:
        rope["mrope_section"] = _fit_sections(rope["mrope_section"], target)


COUPLE_MIN = 32  # default values at least this large, shrunk to at least 16: widths, not counts


def _ruled(key: str) -> bool:
    return any(re.fullmatch(r.pattern, key) for r in SHRINK_RULES) or key == "vocab_size" or bool(_TOKEN_KEY.match(key))


def _couple(d: dict, small: dict) -> dict:

    """Keys the default config ties by value keep the tie after the rules shrink one of them:

    - a config with as many key/value heads as heads (multi-head attention: latent attention builds
      its keys per head) keeps kv heads = heads, instead of the rules' grouped default;
    - a width no rule names (``projector_dim``, ``text_hidden_size`` of another tower) that equals,
      in the default config, a width a rule shrank takes its new value: from the same (sub)config
      if the value there shrank one way, else from the whole config if it shrank one way there.
      Only values of at least ``COUPLE_MIN`` that shrank to 16 or more (widths): small counts
      (depths, heads, experts) coincide by chance."""
    from .hf_shrink import _get

    def leaves(a, b, path=()):
        for k, v in a.items():
            if isinstance(k, str) and k not in ("id2label", "label2id") and k in b:
                if isinstance(v, dict) and isinstance(b[k], dict):
                    yield from leaves(v, b[k], path + (k,))
                elif _is_int(v) and _is_int(b[k]):
                    yield path, k, v, b[k]

    local: dict[tuple, dict[int, set]] = {}
    every: dict[int, set] = {}
    for path, k, v, new in leaves(d, small):
        if _ruled(k) and v >= COUPLE_MIN and 16 <= new < v:
            local.setdefault(path, {}).setdefault(v, set()).add(new)
            every.setdefault(v, set()).add(new)
    for path, k, v, new in list(leaves(d, small)):
        if _ruled(k) or new != v or v < COUPLE_MIN:
            continue
        got = local.get(path, {}).get(v) or every.get(v)
        if got and len(got) == 1:
            _get(small, path)[k] = next(iter(got))
    # multi-head attention stays multi-head
    for path, k, v, new in list(leaves(d, small)):
        if not re.fullmatch(_KV_HEADS, k):
            continue
        heads = {_get(small, path)[h] for h, hv in _get(d, path).items() if h != k and _is_int(hv) and hv == v
                 and re.fullmatch(_HEAD_COUNT, h) and not re.fullmatch(_KV_HEADS, h)}
        if len(heads) == 1:
            _get(small, path)[k] = next(iter(heads))
    # a width the default config makes the sum of two others keeps being their sum
    for path, k, v, new in list(leaves(d, small)):
        for key, parts in SUM_TIES:
            src, dst = _get(d, path), _get(small, path)
            if k == key and all(_is_int(src.get(p)) and _is_int(dst.get(p)) for p in parts) \
                    and v == sum(src[p] for p in parts):
                dst[k] = sum(dst[p] for p in parts)
        for key, (num, den) in QUOTIENT_TIES.items():
            src, dst = _get(d, path), _get(small, path)
            if k == key and all(_is_int(src.get(p)) and _is_int(dst.get(p)) and src[p] > 0 and dst[p] > 0
                                for p in (num, den)) and v == src[num] // src[den]:
                dst[k] = max(dst[num] // dst[den], 1)
        if k in MULTIPLE_TIES and new == v:
            src, dst, w = _get(d, path), _get(small, path), MULTIPLE_TIES[k]
            if _is_int(src.get(w)) and _is_int(dst.get(w)) and src[w] > 0 and v % src[w] == 0:
                dst[k] = v // src[w] * dst[w]
    _couple_lists(d, small)
    return small


def _int_lists(a: dict, b: dict, path=()):
    """(path, key, default, shrunk) of every list leaf of ints (or of int lists) in both configs."""
    for k, v in a.items():
        if isinstance(k, str) and k not in ("id2label", "label2id") and k in b:
            if isinstance(v, dict) and isinstance(b[k], dict):
                yield from _int_lists(v, b[k], path + (k,))
            elif isinstance(v, (list, tuple)) and v and isinstance(b[k], (list, tuple)) and len(b[k]) == len(v):
                yield path, k, v, b[k]


# nested lists of feature-map sizes that follow the image size (SAM2's backbone_feature_sizes:
# image / 4, / 8, / 16 per level)
_IMAGE_SCALED = r".*feature_sizes"


def _couple_lists(d: dict, small: dict) -> None:
    """Per-stage width lists the default config ties keep the tie: a list no rule names that equals,
    in the default, a list a rule shrank (or its reverse: SAM2's ``backbone_channel_list`` is the
    Hiera tower's ``embed_dim_per_stage`` from the top) takes its new value; lists of feature-map
    sizes (``_IMAGE_SCALED``) scale with the image where the whole config shrank its image one way."""
    from .hf_shrink import _get

    ints = lambda v: all(_is_int(x) for x in v)  # noqa: E731
    rows = list(_int_lists(d, small))
    shrunk = {tuple(v): list(new) for _, k, v, new in rows
              if _ruled(k) and ints(v) and ints(new) and len(v) >= 3 and min(v) >= COUPLE_MIN and list(new) != list(v)}
    for path, k, v, new in rows:
        if _ruled(k) or not ints(v) or list(new) != list(v):
            continue
        if tuple(v) in shrunk:
            _get(small, path)[k] = type(v)(shrunk[tuple(v)])
        elif tuple(v[::-1]) in shrunk:
            _get(small, path)[k] = type(v)(shrunk[tuple(v[::-1])][::-1])
    sides = set()  # new / old: the image's side, or its grid of patches where a patch size is set
    for path, k, v, new in itertools.chain(_leaf_ints(d, small), rows):
        if not re.fullmatch(r"image_size|img_size", k):
            continue
        v, new = (v, new) if _is_int(v) else (v[0], new[0])
        p_old, p_new = _get(d, path).get("patch_size"), _get(small, path).get("patch_size")
        if _is_int(p_old) and _is_int(p_new) and p_old > 0 and p_new > 0:
            v, new = v // p_old, new // p_new
        if _is_int(v) and _is_int(new) and 0 < new < v:
            sides.add(fractions.Fraction(new, v))
    if len(sides) != 1:
        return
    (ratio,) = sides
    scale = lambda x: max(1, int(x * ratio)) if _is_int(x) else [scale(y) for y in x]  # noqa: E731
    for path, k, v, new in rows:
        if re.fullmatch(_IMAGE_SCALED, k) and list(new) == list(v):
            _get(small, path)[k] = [scale(x) for x in v]


def _leaf_ints(a: dict, b: dict, path=()):
    for k, v in a.items():
        if isinstance(k, str) and k not in ("id2label", "label2id") and k in b:
            if isinstance(v, dict) and isinstance(b[k], dict):
                yield from _leaf_ints(v, b[k], path + (k,))
            elif _is_int(v) and _is_int(b[k]):
                yield path, k, v, b[k]


# (key, parts): latent attention's query/key head is its no-position part plus its rotary part
# (Mistral4's head_dim = qk_nope_head_dim + qk_rope_head_dim: its rotary width is head_dim x
# partial_rotary_factor, which must stay qk_rope_head_dim)
# key: (numerator, denominator) - a count the default config makes a quotient of two others (SAM's
# prompt encoder's image_embedding_size = image_size / patch_size: the grid its dense prompt covers)
QUOTIENT_TIES = {"image_embedding_size": ("image_size", "patch_size")}
# key: width - a width the default config makes a whole multiple of another (Mllama's vision_output_dim
# = hidden_size x (1 + its intermediate layers): the features it concatenates) keeps the multiple
MULTIPLE_TIES = {"vision_output_dim": "hidden_size"}
SUM_TIES = (("head_dim", ("qk_nope_head_dim", "qk_rope_head_dim")),
            ("qk_head_dim", ("qk_nope_head_dim", "qk_rope_head_dim")))


def shrink_config(config, level: int = 2, kinds: bool = True):
    """A copy of ``config`` (a ``PretrainedConfig``, sub-configs included) with depth, widths,
    heads, experts and vocabulary capped by ``SHRINK_RULES`` up to ``level`` (0: depth and experts;
    1: + widths, heads, vocabulary; 2: + image sizes and per-stage lists). Only ever shrinks.
    ``kinds``: the fewer layers keep one of each kind the per-layer lists name (``_kept_layers``);
    False: the first layers."""
    d = config.to_dict()
    max_token = max(_token_ids(d), default=0)
    small = _couple(d, _shrink_dict(d, level, max_token, kinds=kinds))
    for k in ("transformers_version", "_name_or_path", "architectures"):
        small.pop(k, None)
        d.pop(k, None)
    try:
        out = type(config).from_dict(small)
    except Exception as e:  # noqa: BLE001 - a config class's own validation (heads must divide ...)
        small = _couple(d, _shrink_dict(d, level, max_token, alt=True, kinds=kinds))  # the rules' second choices (Rule.alt)
        for k in ("transformers_version", "_name_or_path", "architectures"):
            small.pop(k, None)
        try:
            out = type(config).from_dict(small)
        except Exception:  # noqa: BLE001
            out = _valid_subset(type(config), d, small, e)
    if level >= 1:
        _fit_mrope(out)
    _fit_image_tokens(out)
    _fit_feature_layers(out)
    _fill_placeholder_ids(out)
    return out


# placeholder ids a checkpoint sets and a default config may leave None (MiniCPM-V's image_token_id):
# without one the model never runs its tower
_PLACEHOLDER_KEYS = ("image_token_id", "video_token_id")


def _fill_placeholder_ids(config) -> None:
    """Give each placeholder key a config declares as None an id of its own at the top of the text
    vocabulary, below every id the configs already use."""
    for c in _sub_configs(config):
        unset = [k for k in _PLACEHOLDER_KEYS if k in c.to_dict() and getattr(c, k, 0) is None]
        if not unset:
            continue
        try:
            vocab = c.get_text_config().vocab_size
        except Exception:  # noqa: BLE001 - a config with no text part has no placeholders to fill
            continue
        used = set(_token_ids(config.to_dict()))
        free = (i for i in range(int(vocab) - 1, 0, -1) if i not in used)
        for k in unset:
            setattr(c, k, next(free))


# keys that index the vision tower's hidden states (depth + 1 of them: the embeddings, then each layer)
_FEATURE_LAYER_KEYS = ("vision_feature_layer", "vision_feature_layers", "feature_layer")


def _fit_feature_layers(config) -> None:
    """Feature layers a VLM takes from its vision tower (VipLlava's (-2, -5, -8, -11, 6)) that the
    shrunk tower no longer has become its nearest layer: as many features, each one that exists."""
    for c in _sub_configs(config):
        tower = getattr(c, "vision_config", None) or c
        depth = getattr(tower, "num_hidden_layers", None)
        if not _is_int(depth):
            continue
        n = depth + 1
        for key in _FEATURE_LAYER_KEYS:
            v = getattr(c, key, None)
            vals = v if isinstance(v, (list, tuple)) else [v]
            if not vals or not all(_is_int(i) for i in vals) or all(-n <= i < n for i in vals):
                continue
            fit = [max(i, -n) if i < 0 else min(i, n - 1) for i in vals]
            setattr(c, key, type(v)(fit) if isinstance(v, (list, tuple)) else fit[0])


def _fit_image_tokens(config) -> None:
    """A projector that pools the vision tower's square grid of patches (image_size / patch_size a
    side) to ``mm_tokens_per_image`` tokens (a square) needs a side that divides the grid's: after
    shrinking (or in a default config whose image is smaller than its checkpoints'), the tokens
    per side become the largest divisor of the patch grid's side not above the old one."""
    for c in _sub_configs(config):
        for k in [k for k in vars(c) if k.endswith("tokens_per_image")]:
            n = getattr(c, k)
            v = getattr(c, "vision_config", None)
            size, patch = getattr(v, "image_size", None), getattr(v, "patch_size", None)
            if not (_is_int(n) and _is_int(size) and _is_int(patch) and patch > 0 and n > 0):
                continue
            side, grid = math.isqrt(n), size // patch
            if side * side != n or grid <= 0 or grid % side == 0:
                continue
            t = max(d for d in range(1, min(side, grid) + 1) if grid % d == 0)
            setattr(c, k, t * t)


def _changes(old, new, path=()) -> list[tuple]:
    """(path, new value) of every leaf where ``new`` differs from ``old``."""
    if isinstance(old, dict) and isinstance(new, dict) and set(old) == set(new):
        return [c for k in old for c in _changes(old[k], new[k], path + (k,))]
    return [] if old == new else [(path, new)]


def _with(d: dict, changes) -> dict:
    import copy

    out = copy.deepcopy(d)
    for path, v in changes:
        node = out
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = copy.deepcopy(v)
    return out


def _valid_subset(cls, d: dict, small: dict, error: Exception):
    """The config class rejects the shrunk values together (its validators tie keys to each other:
    heads dividing widths, a codebook equal to a width): keep as many of the changes as it
    accepts, dropping one change where that is enough, else adding them one by one (two passes)."""
    def ok(changes):
        try:
            return cls.from_dict(_with(d, changes))
        except Exception:  # noqa: BLE001
            return None

    changes = _changes(d, small)
    for i in range(len(changes)):
        if (cfg := ok(changes[:i] + changes[i + 1:])) is not None:
            return cfg
    kept: list = []
    for _ in range(2):
        for ch in changes:
            if ch not in kept and ok(kept + [ch]) is not None:
                kept.append(ch)
    cfg = ok(kept)
    if cfg is None:
        raise error
    return cfg


def _named_sub_configs(config, name: str = ""):
    """(attribute path, config) of ``config`` and every sub-config below it."""
    yield name, config
    for k in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, k, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _named_sub_configs(sub, f"{name}.{k}" if name else k)


_TOWER_CONFIG = re.compile(r"(vision|audio|image|video|speech)[^.]*$")  # a sub-config's path or class name


def _sub_configs(config):
    yield config
    for k in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, k, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _sub_configs(sub)


@functools.lru_cache(maxsize=None)
def _modeling_reads(config_cls: type, key: str) -> bool:
    """Whether the modelling module beside ``config_cls``'s configuration module reads ``key`` with
    a default of its own (``.get("key", ...)``: PaddleOCR-VL's ``mrope_section``), a key the config
    class neither declares nor validates."""
    mod = config_cls.__module__
    if ".configuration_" not in mod:
        return False
    spec = importlib.util.find_spec(mod.replace(".configuration_", ".modeling_"))
    if spec is None or not spec.origin:
        return False
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return re.search(rf"\.get\(\s*[\"']{re.escape(key)}[\"']\s*,", f.read()) is not None
    except OSError:
        return False


def _fit_mrope(config) -> None:
    """Multimodal RoPE splits head_dim / 2 into (t, h, w) sections whose default ([16, 24, 24]) sits in
    the modelling code; a config class that declares the key (``ignore_keys_at_rope_validation``)
    gets sections that fit its shrunk head_dim."""
    for name, c in _named_sub_configs(config):
        declared = "mrope_section" in (getattr(type(c), "ignore_keys_at_rope_validation", None) or ())
        # a text model's rotary reads it with a default; a vision tower's rotary does not
        tower = _TOWER_CONFIG.search(name) or _TOWER_CONFIG.search(type(c).__name__.lower())
        if not declared and not (_modeling_reads(type(c), "mrope_section") and not tower):
            continue
        try:  # per-layer configs refuse a global read of per-layer keys
            rope = getattr(c, "rope_parameters", None)
            heads = getattr(c, "num_attention_heads", None)
            hd = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else None)
        except Exception:  # noqa: BLE001
            continue
        if not isinstance(rope, dict) or not hd:
            continue
        sec = rope.get("mrope_section") or [16, 24, 24]
        target = _mrope_target(hd, rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) or 1.0)
        if sum(sec) != target:
            rope["mrope_section"] = _fit_sections(sec, target)


def assign_placeholder_ids(config) -> dict[str, int]:
    """A multimodal config that declares a placeholder id (``image_token_id``, ``audio_token_id``,
    ``video_token_id`` or ``*_token_index``) but leaves it unset gets one, as a processor would
    when it adds the token: the highest id below min(vocab, 256) that no other special id takes
    (so a shrunk vocabulary still holds it). Returns what it set ({} for most configs)."""
    set_: dict[str, int] = {}
    keys = [(k, a) for k in ("image", "video", "audio") for a in (f"{k}_token_id", f"{k}_token_index")]
    unset = [a for k, a in keys if a in getattr(config, "__dict__", {}) or hasattr(type(config), a)]
    unset = [a for a in unset if getattr(config, a, 0) is None]
    if not unset:
        return set_
    try:
        text = config.get_text_config()
    except Exception:  # noqa: BLE001
        text = config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or 256
    taken = set(_token_ids(config.to_dict()))
    free = [i for i in range(min(int(vocab), 256) - 1, 3, -1) if i not in taken]
    for kind in ("image", "video", "audio"):
        attrs = [a for a in (f"{kind}_token_id", f"{kind}_token_index") if a in unset]
        if attrs and free:
            tok = free.pop(0)
            for a in attrs:
                setattr(config, a, tok)
                set_[a] = tok
    return set_


def no_cache(config) -> None:
    """``use_cache=False`` on the config and every sub-config that has the key: a model built to be
    planned for training runs a training forward, which builds no KV cache (a hybrid model's cache
    of only linear-attention layers cannot even answer ``get_seq_length``)."""
    for c in _sub_configs(config):
        if "use_cache" in getattr(c, "__dict__", {}) or hasattr(type(c), "use_cache"):
            with contextlib.suppress(Exception):  # a config that derives it (a property) keeps its own
                c.use_cache = False


def _count_meta(cls, config) -> int:
    with torch.device("meta"):
        m = cls(config)
    return sum(p.numel() for p in m.parameters())


def build(model_type: str, size: str = "small", device: str | torch.device | None = None,
          max_small_params: int = 30_000_000, probe: bool = True, head: str | None = None):
    """``(model, info)`` for a config type. ``size="default"``: the default config (use
    ``device="meta"`` for a full-size model with no memory). ``size="small"``: the default config
    shrunk at the highest level whose model builds, stays under ``max_small_params`` and runs
    forward on its ``example_inputs`` (``probe``; ``info["inputs"]``, None without the probe);
    ``info["level"]`` says which, ``info["tried"]`` why the higher ones were left. Raises the last
    level's error when none works."""
    if size not in ("small", "default"):
        raise ValueError(f"size must be 'small' or 'default', got {size!r}")
    cls = model_class(model_type, head)
    config = default_config(model_type)
    assigned = assign_placeholder_ids(config)
    no_cache(config)
    if size == "default":
        with torch.device(device or "cpu"):
            return cls(config).eval(), {"level": None, "config": config, "class": cls.__name__, "assigned": assigned}
    tried: list[str] = []
    err: Exception | None = None
    # at each level, first the layers of every kind; where those fail (a kind the default config
    # cannot build, a tie that needs two layers of a kind), the first layers, and info says why
    seen: dict[str, tuple[str, int]] = {}  # each shrunk config is tried once (levels often shrink to the same)
    over: set[int] = set()  # levels over the parameter budget: other layers of the same sizes would be too
    for level, kinds in itertools.product((2, 1, 0), (True, False)):
        if not kinds and level in over:
            continue
        what = f"level {level}" + ("" if kinds else ", first layers")
        try:
            small = shrink_config(config, level, kinds)
            key = json.dumps(small.to_dict(), sort_keys=True, default=str)
            if key in seen:
                first, at = seen[key]
                if at in over:
                    over.add(level)
                if at != level:  # the first layers equal to this level's kinds: nothing to say
                    tried.append(f"{what}: the config of {first}")
                continue
            seen[key] = (what, level)
            n = _count_meta(cls, small)
            if n > max_small_params:  # size kept in keys no rule names: read them off the model
                from .hf_shrink import fit_params
                small, n = fit_params(cls, small, max_small_params // 4, _count_meta, hard=max_small_params)
            if n > max_small_params:
                over.add(level)
                raise ValueError(f"{n / 1e6:.1f}M parameters > {max_small_params / 1e6:.0f}M")
            with torch.device(device or "cpu"):
                model = cls(small).eval()
            inputs = None
            if probe:
                inputs = example_inputs(model)
                with torch.no_grad():
                    model(**inputs)
            return model, {"level": level, "config": small, "class": cls.__name__, "tried": tried,
                           "assigned": assigned, "inputs": inputs, "layer_kinds": kinds}
        except Exception as e:  # noqa: BLE001 - any failure means: shrink less
            err = e
            tried.append(f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
    assert err is not None
    raise type(err)(f"{model_type}: no shrink level builds and runs ({'; '.join(tried)})") from err


# ---------------------------------------------------------------------------------------------
# example inputs
# ---------------------------------------------------------------------------------------------
SEQ = 16


@dataclass
class _Ctx:
    model: nn.Module
    config: Any
    batch: int
    seq: int
    g: torch.Generator
    device: torch.device
    params: dict

    def sub(self, *kinds: str):
        """The first sub-config of these kinds (``vision``, ``audio``, ``text``...), else the config."""
        for kind in kinds:
            for attr in (f"{kind}_config", f"{kind}_encoder_config", f"{kind}_tower_config", kind):
                c = getattr(self.config, attr, None)
                if c is not None and hasattr(c, "to_dict"):
                    return c
        return self.config

    def text(self):
        get = getattr(self.config, "get_text_config", None)
        try:
            return get(decoder=True) if get else self.config
        except TypeError:
            return get()

    def first(self, cfg, *keys, default=None):
        for k in keys:
            v = getattr(cfg, k, None)
            if v is not None and not isinstance(v, bool):
                return v
        return default

    # made on the CPU (a generator's device), moved to the model's device at the end
    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g)

    def randint(self, lo, hi, *shape):
        return torch.randint(lo, max(hi, lo + 1), shape, generator=self.g)


def _vocab(c: _Ctx, cfg=None) -> int:
    cfg = cfg or c.text()
    v = c.first(cfg, "vocab_size", default=None) or c.first(c.config, "vocab_size", default=256)
    return int(v)


def _ordinary_ids(c: _Ctx, n: int, cfg=None) -> torch.Tensor:
    """Token ids that are not special: above the low ids (pad/bos/eos/unk sit there) and clear of
    every ``*_token_id`` the config names (image/audio placeholders would ask for features)."""
    vocab = _vocab(c, cfg)
    special = set(_token_ids(c.config.to_dict()))
    lo = min(4, vocab - 1)
    ids = c.randint(lo, vocab, c.batch, n)
    if special:
        ok = torch.tensor(sorted(x for x in range(lo, min(vocab, lo + 64)) if x not in special) or [lo])
        ids = torch.where(torch.isin(ids, torch.tensor(sorted(special))), ok[0], ids)
    return ids


def _image_size(c: _Ctx) -> tuple[int, int, int]:
    v = c.sub("vision", "image", "backbone")
    ch = int(c.first(v, "num_channels", "in_channels", "in_chans", "input_channels", default=3))
    s = c.first(v, "image_size", "img_size", "input_size", "crop_size", default=None)
    if s is None:
        s = c.first(c.config, "image_size", default=None) or _strict_image_size(c.model) or 64
    if isinstance(s, dict):
        s = (s.get("height", 64), s.get("width", 64))
    if isinstance(s, (list, tuple)):
        s = [int(x) for x in s][-2:]
        h, w = (s[0], s[0]) if len(s) == 1 else s
    else:
        h = w = int(s)
    return ch, h, w


def _strict_image_size(model: nn.Module):
    """The (H, W) a patch embedding insists on (timm's ``strict_img_size``: a wrapped timm ViT
    whose config names only its architecture), else None."""
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if getattr(m, "strict_img_size", False) is True and isinstance(size, (tuple, list)) and len(size) == 2:
            return [int(x) for x in size]
    return None


def _grid(c: _Ctx) -> tuple[int, int, int]:
    v = c.sub("vision")
    merge = int(c.first(v, "spatial_merge_size", "merge_size", default=2) or 2)
    return 1, 2 * merge, 2 * merge


def _patch_geometry(c: _Ctx) -> tuple[Any, Any]:
    """The vision config's (image channels, patch size) as it states them (3, None where absent)."""
    v = c.sub("vision")
    return c.first(v, "in_channels", "num_channels", "in_chans", default=3), c.first(v, "patch_size", default=None)


def _patch_width(c: _Ctx) -> int:
    """Values per flattened patch: channels x temporal patch (where the config has one) x patch^2."""
    v = c.sub("vision")
    ch, p = _patch_geometry(c)
    ch, p = int(ch), 14 if p is None else p
    p = int(p[0] if isinstance(p, (list, tuple)) else p)
    tp = int(c.first(v, "temporal_patch_size", "patch_temporal", "temporal_patch", default=1) or 1)
    return ch * tp * p * p


def _patches(c: _Ctx):
    """Qwen2-VL style: pixel_values are flattened patches, (images x t*h*w, C*T*P*P), with a grid."""
    t, h, w = _grid(c)
    return c.randn(c.batch * t * h * w, _patch_width(c))


def _grid_thw(c: _Ctx):
    return torch.tensor([list(_grid(c))] * c.batch)


def _merge_sizes(c: _Ctx):
    merge = int(c.first(c.sub("vision"), "spatial_merge_size", "merge_size", default=2) or 2)
    return torch.full((c.batch,), merge, dtype=torch.long)


# forwards that take images as a padded sequence of patches with their layout beside them
# (NaFlex: spatial_shapes; 2-D patch coordinates: pixel_position_ids)
_PATCH_SEQ = ("spatial_shapes", "pixel_position_ids")


def _side(c: _Ctx) -> int:
    """Patches per side of a synthetic image: twice the merge / pooling kernel, at least 4."""
    k = int(c.first(c.sub("vision"), "spatial_merge_size", "merge_size", "pooling_kernel_size", default=1) or 1)
    return 2 * max(k, 2)


# a tower's sub-config slot and the inputs only that tower reads
_TOWER_INPUTS = (("vision_config", ("pixel_values", "pixel_values_videos")),
                 ("audio_config", ("input_features", "input_values", "audio_mel", "audio_values")))


def _absent_inputs(c: _Ctx) -> set[str]:
    """Inputs of towers the config leaves out (Gemma 4's default config: ``vision_config`` and
    ``audio_config`` None, so the model has no vision or audio tower): nothing would read them."""
    slots = getattr(c.config, "sub_configs", None) or {}
    return {k for slot, keys in _TOWER_INPUTS if slot in slots and getattr(c.config, slot, 0) is None for k in keys}


def _tiled(c: _Ctx, got: dict) -> dict:
    """Images cut into up to ``max_num_tiles`` tiles (Mllama): (batch, 1 image, tiles, C, H, W), the
    image's aspect-ratio id (1: the first supported ratio, one tile; 0 pads) and its tile mask."""
    x = got["pixel_values"]
    tiles = int(c.first(c.sub("vision"), "max_num_tiles", default=4))
    mask = torch.zeros(x.shape[0], 1, tiles, dtype=torch.long)
    mask[..., 0] = 1
    return {**got, "pixel_values": c.randn(x.shape[0], 1, tiles, *x.shape[1:]).to(x.device),
            "aspect_ratio_ids": torch.ones(x.shape[0], 1, dtype=torch.long, device=x.device),
            "aspect_ratio_mask": mask.to(x.device)}


def _patch_row(c: _Ctx, got: dict) -> dict:
    """Images of any size packed as one row of patches, (1, C, P, patches x P), with each image's
    patch grid in ``target_sizes`` (batch, 2): MiniCPM-V's variable-resolution tower (the name a
    forward takes them under says the layout)."""
    ch, p = _patch_geometry(c)
    p = int(p[0] if isinstance(p, (list, tuple)) else (p or 14))
    s = _side(c)
    return {**got, "pixel_values": c.randn(1, int(ch), p, c.batch * s * s * p).to(c.device),
            "target_sizes": torch.tensor([[s, s]] * c.batch, dtype=torch.int32, device=c.device)}


def _patch_seq(c: _Ctx):
    return c.randn(c.batch, _side(c) ** 2, _patch_width(c))


def _embeds_flat_patches(c: _Ctx) -> bool:
    """The model embeds each patch with a Linear over its flattened values (Fuyu's 30x30x3 = 2700,
    Molmo2's 14x14x3 = 588) and has no convolution over the image channels to patchify: its
    pixel_values may be patch sequences (batch, patches, channels x patch^2) rather than images."""
    ch, p = _patch_geometry(c)
    if not _is_int(ch) or not (_is_int(p) or isinstance(p, (list, tuple)) and p and all(map(_is_int, p))):
        return False  # per-stage channel lists (EfficientNet's in_channels), no patch size: not a patch model
    width, linear, conv = _patch_width(c), False, False
    for m in c.model.modules():
        if isinstance(m, nn.Linear) and m.in_features == width:
            linear = True
        elif isinstance(m, nn.modules.conv._ConvNd) and m.in_channels == ch:
            conv = True
    return linear and not conv


def _flattened_patches(c: _Ctx):
    """Pix2Struct's variable-resolution patches: each row is (row, column, the patch's values),
    the 1-based position ahead of ``patch_embed_hidden_size`` values."""
    s = _side(c)
    width = c.first(c.sub("vision"), "patch_embed_hidden_size", default=None) or _patch_width(c)
    yy, xx = torch.meshgrid(torch.arange(1, s + 1), torch.arange(1, s + 1), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1).float().expand(c.batch, -1, -1)
    return torch.cat([pos, c.randn(c.batch, s * s, int(width))], -1)


def _spatial_shapes(c: _Ctx):
    return torch.tensor([[_side(c), _side(c)]] * c.batch)


def _pixel_position_ids(c: _Ctx):
    s = _side(c)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1).expand(c.batch, -1, -1).clone()


def _pixel_values(c: _Ctx):
    if any(k in c.params for k in ("image_grid_thw", "grid_thw")):
        return _patches(c)
    if any(k in c.params for k in _PATCH_SEQ):
        return _patch_seq(c)
    if c.first(c.sub("vision"), "num_frames", default=None) and "pixel_values_videos" not in c.params:
        return _videos(c)  # video models (timesformer, vivit, videomae) take clips as pixel_values
    ch, h, w = _image_size(c)
    return c.randn(c.batch, ch, h, w)


def _videos(c: _Ctx):
    ch, h, w = _image_size(c)
    v = c.sub("vision")
    t = int(c.first(v, "num_frames", "frames", default=None) or c.first(c.config, "num_frames", default=2))
    return c.randn(c.batch, t, ch, h, w)


def _audio_cfg(c: _Ctx):
    return c.sub("audio", "encoder", "speech")


# config keys whose product the number of raw samples must be a multiple of (a patching encoder's
# per-stage patch sizes, a codec's downsampling ratios)
_SAMPLE_MULTIPLES = ("patch_sizes", "downsampling_ratios")
# (config key, factor): feature frames come in whole chunks of key x factor frames (Qwen3-ASR's
# windowed encoder: n_window * 2)
_FRAME_CHUNKS = (("n_window", 2),)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _frames(c: _Ctx, a, n: int = 32) -> int:
    for key, f in _FRAME_CHUNKS:
        m = c.first(a, key, default=None)
        if _is_int(m) and m > 0:
            n = _round_up(n, m * f)
    return n


def _sample_multiple(c: _Ctx, a) -> int | None:
    """Samples per frame of a patching encoder or codec: the product of the first of
    ``_SAMPLE_MULTIPLES`` the config has, else None."""
    for key in _SAMPLE_MULTIPLES:
        m = c.first(a, key, default=None)
        m = math.prod(m) if isinstance(m, (list, tuple)) and m and all(_is_int(x) for x in m) else None
        if m and m > 1:
            return m
    return None


def _input_values(c: _Ctx):
    a = _audio_cfg(c)
    # a second of 16 kHz audio shrunk to what the feature encoder's strides still turn into a few frames
    strides = c.first(a, "conv_stride", default=None)
    hop = math.prod(strides) if isinstance(strides, (list, tuple)) and strides else 320
    n = max(hop * 8, 1600)
    if m := _sample_multiple(c, a):  # encoders that cut samples into whole patches of m samples
        n = _round_up(n, m)
    chans = c.first(a, "audio_channels", default=None)
    if chans and int(chans) > 1:
        return c.randn(c.batch, int(chans), n)
    return c.randn(c.batch, n)  # codecs that want (batch, 1, samples) get it from _layouts


# config keys that state the mel bins per frame; where none does, the filterbank sizes speech
# front ends use (80: Whisper v1-2, Conformer / NeMo; 128: Whisper v3, Gemma 3n/4) are tried
_MEL_KEYS = ("num_mel_bins", "feature_size", "input_feat_size", "input_feat_per_channel", "n_mels", "num_mel_filters")
MEL_BINS = (80, 128)


def _input_features(c: _Ctx):
    a = _audio_cfg(c)
    # feature_projection_input_dim: the width the first layer reads frames at (stacked mel frames:
    # SeamlessM4T's 160 = 80 bins x stride 2), where the config holds no bin count
    mel = c.first(a, *_MEL_KEYS, "feature_projection_input_dim", default=MEL_BINS[0])
    src = c.first(a, "max_source_positions", default=None)
    if src is not None and c.first(a, "num_mel_bins", default=None) is not None:
        # Whisper-style encoders want exactly 2 x max_source_positions frames (two convs, stride 2)
        frames = 2 * int(src)
        return c.randn(c.batch, int(mel), frames)
    return c.randn(c.batch, _frames(c, a), int(mel) * int(c.first(a, "input_channels", default=1)))


def _bbox(c: _Ctx):
    xy = c.randint(0, 500, c.batch, c.seq, 2)
    wh = c.randint(1, 500, c.batch, c.seq, 2)
    return torch.cat([xy, xy + wh], -1)


def _decoder_ids(c: _Ctx):
    cfg = c.text()
    return _ordinary_ids(c, max(2, c.seq // 2), cfg)


def _ones_like(key: str):
    return lambda c, got: torch.ones_like(got[key], dtype=torch.long) if key in got and got[key].dim() == 2 \
        else torch.ones(c.batch, c.seq, dtype=torch.long)


def _past_values(c: _Ctx):
    # time series: context + the largest lag, channels = input_size / num_input_channels
    ctx = int(c.first(c.config, "context_length", "sequence_length", default=32) or 32)
    lags = c.first(c.config, "lags_sequence", default=None) or [0]
    multi = c.first(c.config, "num_input_channels", default=None)  # PatchTST-style: always (b, t, channels)
    ch = int(multi or c.first(c.config, "input_size", "num_channels", default=1) or 1)
    shape = (c.batch, ctx + max(lags)) + ((ch,) if ch > 1 or multi else ())
    return c.randn(*shape)


# name -> how to make it; "when": "always" (make it whenever forward has it), "required" (only if
# forward requires it or it is the main input), "with:a|b" (when a or b was made), "with-param:p"
# (when required and forward also takes p), "encdec" (encoder-decoders), "mask" (after the rest).
# Functions take (ctx) or, for masks, (ctx, made so far).
INPUT_RULES: dict[str, tuple[str, Callable]] = {
    "input_ids": ("always", lambda c: _ordinary_ids(c, c.seq)),
    "pixel_values": ("always", _pixel_values),
    "pixel_values_videos": ("required", _videos),
    # a vision tower that takes its flattened patches as hidden_states beside their grid (Qwen2-VL's)
    "hidden_states": ("with-param:grid_thw", _patches),
    "image_grid_thw": ("with:pixel_values", lambda c: _grid_thw(c)),
    "grid_thw": ("with:pixel_values|hidden_states", lambda c: _grid_thw(c)),
    "merge_sizes": ("with:grid_thw", _merge_sizes),
    "spatial_shapes": ("with:pixel_values", _spatial_shapes),
    "pixel_position_ids": ("with:pixel_values", _pixel_position_ids),
    "pixel_attention_mask": ("with:spatial_shapes", lambda c: torch.ones(c.batch, _side(c) ** 2, dtype=torch.long)),
    "flattened_patches": ("always", lambda c: _flattened_patches(c)),
    # region features of a detector and their boxes (LXMERT): num_visual_features x visual_feat_dim
    "visual_feats": ("always", lambda c: c.randn(c.batch, SEQ, int(c.first(c.config, "visual_feat_dim", default=2048)))),
    "visual_pos": ("with:visual_feats", lambda c: torch.rand(c.batch, SEQ, int(c.first(c.config, "visual_pos_dim", default=4)),
                                                             generator=c.g)),
    # a vocoder's mel spectrogram, (batch, frames, model_in_dim) (HiFi-GAN)
    "spectrogram": ("always", lambda c: c.randn(c.batch, 2 * SEQ, int(c.first(c.config, "model_in_dim", default=80)))),
    # the language adapter each sample runs through (X-MOD): the first
    "lang_ids": ("with:input_ids", lambda c: torch.zeros(c.batch, dtype=torch.long)),
    "input_values": ("always", _input_values),
    "input_features": ("always", _input_features),
    "audio_mel": ("always", _input_features),  # a mel spectrogram under its own name (Gemma3n's)
    "bbox": ("always", _bbox),
    "decoder_input_ids": ("encdec", _decoder_ids),
    "past_values": ("always", _past_values),
    "attention_mask": ("mask", _ones_like("input_ids")),
    "decoder_attention_mask": ("mask", _ones_like("decoder_input_ids")),
    "past_observed_mask": ("mask", lambda c, got: torch.ones_like(got["past_values"])),
}


# what the dimension names of forward's docstrings ("of shape `(batch_size, sequence_length)`") mean
_BATCH_DIMS = {"batch_size", "batch", "num_images", "num_audios", "num_images_or_videos"}
_SEQ_DIMS = {"sequence_length", "seq_len", "seq_length", "num_tokens", "target_sequence_length", "frames",
             "num_frames", "max_num_frames", "time", "length", "episode_length"}
# image dimensions a docstring names: the vision config's image size, (height, width)
_IMAGE_DIMS = {"height": 0, "width": -1}
_DOC_ARG = re.compile(r"^\s*(\w+) \(`([^`]*)`[^\n]*?of shape `?\(([^`)]*)\)`?", re.M)


def _doc_args(model: nn.Module) -> dict[str, tuple[str, str]]:
    """forward's documented arguments: name -> (type, shape text)."""
    return {m.group(1): (m.group(2), m.group(3)) for m in _DOC_ARG.finditer(type(model).forward.__doc__ or "")}


def _width(c: _Ctx) -> int | None:
    for cfg in (c.config, c.text()):
        v = c.first(cfg, "hidden_size", "d_model", "n_embd", "embed_dim", default=None)
        if _is_int(v):
            return v
    return None


def _dim(c: _Ctx, name: str) -> int | None:
    name = name.strip()
    if name.isdigit():
        return int(name)
    if name in _BATCH_DIMS:
        return c.batch
    if name in _SEQ_DIMS:
        return c.seq
    if name == "hidden_size":
        return _width(c)
    if name in _IMAGE_DIMS:
        size = c.first(c.sub("vision"), "image_size", "img_size", default=None)
        size = size[_IMAGE_DIMS[name]] if isinstance(size, (list, tuple)) and size else size
        return int(size) if _is_int(size) and size > 0 else None
    for cfg in _sub_configs(c.config):
        v = getattr(cfg, name, None)
        if _is_int(v) and v > 0:
            return v
    return None


def _from_doc(c: _Ctx, name: str) -> torch.Tensor | None:
    """A required input no rule makes: the shape its docstring gives, each dimension a batch, a
    sequence, the width or a config key; ``*_ids`` are token ids, ``*_embeds`` and hidden states
    (batch, seq, width) where the docstring says nothing. None where a dimension has no meaning."""
    typ, shape = _doc_args(c.model).get(name, ("", ""))
    dims = [d for d in shape.split(",") if d.strip()] if shape else []
    if dims:
        sizes = [_dim(c, d) for d in dims]
        if all(sizes):
            if "Long" in typ or "Int" in typ or name.endswith(("_ids", "_idx", "_index")):
                return c.randint(0, min(sizes[-1] if len(sizes) > 1 else 2, _vocab(c)), *sizes) \
                    if not name.endswith("mask") else torch.ones(*sizes, dtype=torch.long)
            if "Bool" in typ or name.endswith("mask"):
                return torch.ones(*sizes, dtype=torch.bool if "Bool" in typ else torch.long)
            return c.randn(*sizes)
    if name.endswith("input_ids"):
        return _ordinary_ids(c, c.seq)
    if name.endswith(("_embeds", "hidden_states")) and (w := _width(c)):
        return c.randn(c.batch, c.seq, w)
    return None


def _forward_params(model: nn.Module) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(model.forward)
    return {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _is_encdec(model, params) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False)) or (
        "decoder_input_ids" in params and "input_ids" not in params)


def example_inputs(model: nn.Module, batch: int = 2, seq_len: int = SEQ, seed: int = 0,
                   device: str | torch.device | None = None, probe: bool = True) -> dict[str, torch.Tensor]:
    """Keyword inputs for one forward of a transformers ``PreTrainedModel``: ``model(**inputs)``.

    From ``forward``'s signature, ``main_input_name`` and the config: token ids (clear of special
    ids) and masks for text, ``pixel_values`` at the vision config's channels and image size,
    ``input_values`` / ``input_features`` from the audio config, video frames, bounding boxes,
    decoder ids for encoder-decoders, and both towers of a multimodal model (with the image
    placeholder tokens its vision tower's features fill). Tensors go to ``device`` (default: the
    model's own, ``meta`` included; on meta, integer and boolean tensors stay on the CPU with their
    values, as forwards read them: run such a forward under :func:`meta_values`). ``probe``: where the layout is not fixed by the config (audio
    as (batch, samples) or (batch, 1, samples), features frames- or bins-first, one image or
    several per sample: :func:`input_layouts`), the first layout that one forward of the model
    runs on (no_grad; on meta, under :func:`meta_values`); the first layout where none does."""
    layouts = iter_layouts(model, batch, seq_len, seed, device)
    first, second = next(layouts), next(layouts, None)
    if probe and second is not None:  # one layout: nothing to choose
        for got in itertools.chain([first, second], layouts):
            if _runs(model, got):
                return got
    return first


def input_layouts(model: nn.Module, batch: int = 2, seq_len: int = SEQ, seed: int = 0,
                  device: str | torch.device | None = None) -> list[dict[str, torch.Tensor]]:
    """The example inputs (:func:`example_inputs`) in each layout the config leaves open, the most
    likely first: a caller that runs the model anyway (a planner) can take the first and try the
    others only where it does not fit (:func:`iter_layouts` makes each only when asked)."""
    return list(iter_layouts(model, batch, seq_len, seed, device))


def iter_layouts(model: nn.Module, batch: int = 2, seq_len: int = SEQ, seed: int = 0,
                 device: str | torch.device | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`input_layouts` one at a time: each layout's placeholders are filled (a run of the
    model's tower, which counts its features) only when the caller asks for that layout."""
    tf = _tf()
    if not isinstance(model, tf.PreTrainedModel):
        raise TypeError(f"example_inputs wants a transformers PreTrainedModel, got {type(model).__name__}; "
                        "for other models pass your own example inputs")
    params = _forward_params(model)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    c = _Ctx(model, model.config, batch, seq_len, torch.Generator().manual_seed(seed), torch.device(device), params)
    main = model.main_input_name
    mains = set(main if isinstance(main, (list, tuple)) else [main])
    required = {n for n, p in params.items() if p.default is p.empty}
    got: dict[str, torch.Tensor] = {}
    absent = _absent_inputs(c) - mains - required
    for name, (when, make) in INPUT_RULES.items():
        if name not in params or when == "mask" or name in absent:
            continue
        if when.startswith("with-param:"):
            if when[11:] in params and (name in required or name in mains):
                got[name] = make(c)
        elif when == "always" or name in mains or name in required or (when == "encdec" and _is_encdec(model, params)):
            got[name] = make(c)
        elif when.startswith("with:") and any(k in got for k in when[5:].split("|")):
            got[name] = make(c)
    # on meta, all-ones masks are left out: they mean what no mask means, and mask code reads values (.item())
    for name, (when, make) in INPUT_RULES.items() if c.device.type != "meta" else ():
        if when == "mask" and name in params and any(k in got for k in ("input_ids", "decoder_input_ids", "past_values")):
            if name == "past_observed_mask" and "past_values" not in got:
                continue
            if name == "decoder_attention_mask" and "decoder_input_ids" not in got:
                continue
            if name == "attention_mask" and "input_ids" not in got:
                continue
            got[name] = make(c, got)
    for name in [n for n in params if (n in required or n in mains) and n not in got]:
        if (x := _from_doc(c, name)) is not None:
            got[name] = x
    layouts = _audio_layouts(c, got)  # the first: as made, with its frame mask where forward takes one
    # a model that encodes the audio when both it and text are given may apply the text's mask to the
    # audio frames (SeamlessM4T): an all-ones mask means what none does, so each such layout also without it
    layouts += [{k: v for k, v in g.items() if k != "attention_mask"} for g in layouts
                if "attention_mask" in g and (a := next((g[k] for k in _AUDIO_KEYS if k in g), None)) is not None
                and g["attention_mask"].shape[-1] not in a.shape[1:]]
    first = layouts[0]
    px = first.get("pixel_values")
    if px is not None and px.dim() == 4 and _embeds_flat_patches(c):
        # a Linear over flattened patches and no convolution: pixel_values may be patch sequences
        # (Fuyu), or images the model patchifies itself (RADIO): both, images first
        layouts.append({**first, "pixel_values": _patch_seq(c)})
    if px is not None and px.dim() == 4 and "target_sizes" in c.params and "target_sizes" not in first:
        layouts.insert(0, _patch_row(c, first))  # the layout the name says
    if px is not None and px.dim() == 4 and "aspect_ratio_ids" in c.params and "aspect_ratio_ids" not in first:
        layouts.insert(0, _tiled(c, first))  # the layout the names say
    missing = [n for n in required if n not in layouts[0] and n not in mains]
    missing += [n for n in mains if n not in layouts[0] and n in params]
    if missing:
        raise ValueError(f"nerofy.example_inputs cannot make {', '.join(sorted(set(missing)))} for "
                         f"{type(model).__name__}.forward; pass example inputs of your own")
    return _filled(c, layouts)


def _keeps_values(c: _Ctx, t: torch.Tensor) -> bool:
    """On meta, integer and boolean inputs (ids, token types, image grids and sizes, masks) stay on
    the CPU with their values: forwards read them (``grid.tolist()``, ``ids == image_token_id``,
    a group-by over token types) to split, count and reshape, and a meta tensor has no values.
    Where such a tensor meets the meta model, the op runs on meta (:func:`meta_values`)."""
    return c.device.type == "meta" and t.device.type == "cpu" and not t.is_floating_point()


def _filled(c: _Ctx, layouts: list[dict]) -> Iterator[dict[str, torch.Tensor]]:
    for got in layouts:
        got = {k: v if _keeps_values(c, v) else v.to(c.device) for k, v in got.items()}
        _fill_placeholders(c, got)  # per layout: how many features a tower makes depends on it
        px = got.get("pixel_values")
        if px is not None and px.dim() == 5 and "image_attention_mask" in c.params and "input_ids" in got:
            # several images per sample, cross-attended (IDEFICS): every token sees every image
            got["image_attention_mask"] = torch.ones(*got["input_ids"].shape, px.shape[1], dtype=torch.long,
                                                     device=c.device)
        yield got


# Audio inputs come in more layouts than the config says: (batch, samples) or (batch, channels,
# samples); features (batch, frames, bins), (batch, bins, frames) or (batch, 1, frames, bins),
# with bins the config's mel bins or the width its feature projection takes (stacked frames).
# Where the forward takes a mask of frames, it gets all ones.
_FRAME_MASKS = ("input_features_mask", "feature_attention_mask", "audio_mel_mask")
_AUDIO_KEYS = ("input_values", "input_features", "audio_mel")


# image sides to try where the config's (or the default 64) does not fit: detectors pick their
# top-k queries among the encoder's tokens, so small images have too few
IMAGE_SIDES = (224, 640)


def _image_layouts(c: _Ctx, got: dict) -> list[dict]:
    """Images as (batch, C, H, W) or, for models that take several images per sample, (batch, 1,
    C, H, W) and (batch, 2, C, H, W); then larger square sides (``IMAGE_SIDES``) where the image is smaller."""
    x = got.get("pixel_values")
    if x is not None and x.dim() == 2:  # packed flat patches: some towers take them as patch images
        return [got] + [{**got, "pixel_values": p} for p in _patch_images(c, x)]
    if x is None or x.dim() != 4:
        return [got]
    # one image per sample as a stack of one, then pairs (keypoint matchers: LightGlue takes two)
    out = [got, {**got, "pixel_values": x[:, None]},
           {**got, "pixel_values": torch.stack([x, x.flip(-1)], 1)}]  # the pair's second: a mirror (no draw)
    sized = "image_sizes" in c.params and "image_sizes" not in got  # each image's own (H, W) before tiling
    if sized:
        out.append({**got, "image_sizes": torch.tensor([list(x.shape[-2:])] * x.shape[0])})
        if (tiles := _tile_count(c, x.shape[-1])) is not None:  # any-resolution tiles of each image
            out.append({**got, "image_sizes": out[-1]["image_sizes"],
                        "pixel_values": c.randn(x.shape[0], tiles, *x.shape[1:]).to(x.device)})
    for side in IMAGE_SIDES:
        if side > max(x.shape[-2:]):
            g = {**got, "pixel_values": c.randn(x.shape[0], x.shape[1], side, side)}
            out.append(g)
            if sized:
                out.append({**g, "image_sizes": torch.tensor([[side, side]] * x.shape[0])})
    return out


def _tile_count(c: _Ctx, side: int) -> int | None:
    """Tiles (the base image + its grid) an any-resolution model (LLaVA-NeXT's
    ``image_grid_pinpoints``) cuts a ``side`` x ``side`` image into, by the model's own helper."""
    pins = getattr(c.config, "image_grid_pinpoints", None)
    count = getattr(sys.modules.get(type(c.model).__module__), "image_size_to_num_patches", None)
    if not pins or count is None:
        return None
    try:
        return int(count((side, side), pins, side))
    except Exception:  # noqa: BLE001 - a helper of another signature: no such layout
        return None


def _patch_images(c: _Ctx, x: torch.Tensor) -> list[torch.Tensor]:
    """Packed flat patches (N, C*T*P*P) as the patch images they flatten: (N, C, [T,] P, P), and
    those as one sequence, (1, N, C, [T,] P, P) (PaddleOCR-VL's tower unpacks five dims)."""
    ch, p = _patch_geometry(c)
    if not (_is_int(ch) and _is_int(p)) or x.shape[1] != _patch_width(c):
        return []
    tp = _patch_width(c) // (int(ch) * int(p) ** 2)
    img = x.reshape(x.shape[0], int(ch), *((tp,) if tp > 1 else ()), int(p), int(p))
    return [img, img[None]]


def _audio_layouts(c: _Ctx, got: dict) -> list[dict]:
    """The inputs with each alternative audio layout, the synthesised one first."""
    a = _audio_cfg(c)
    key = next((k for k in _AUDIO_KEYS if k in got), None)
    if key is None:
        return _image_layouts(c, got)
    x = got[key]
    b = x.shape[0]
    alts: list[tuple[torch.Tensor, int]] = []  # (tensor, its frame axis or -1 for raw samples)
    if x.dim() == 2:  # raw samples
        alts += [(x, -1), (x[:, None], -1)]
        mel = c.first(a, "num_mel_bins", default=None)
        if mel:  # a spectrogram under the name input_values (AST): frames = the config's max_length
            frames = int(c.first(a, "max_length", default=None) or 2 * c.seq)
            alts.append((c.randn(b, frames, int(mel)).to(x.device), 1))
    elif x.dim() == 3:
        t_axis = 2 if c.first(a, "max_source_positions", default=None) is not None and \
            c.first(a, "num_mel_bins", default=None) is not None else 1
        alts += [(x, t_axis), (x.transpose(1, 2).contiguous(), 3 - t_axis), (x.transpose(1, 2)[:, None]
                 .contiguous() if t_axis == 2 else x[:, None], 2)]
        if t_axis == 1:
            for t in _feature_widths(c, a, x, mel=False):
                alts.insert(1, (t, 1))
            alts += [(t, 1) for t in _feature_widths(c, a, x, stacked=False)]  # guessed bins: last
    else:
        return [got]
    out = []
    for t, axis in alts:
        g = {**got, key: t}
        for m in _FRAME_MASKS:
            if m in c.params and axis >= 0:
                g[m] = torch.ones(b, t.shape[axis], dtype=torch.bool, device=t.device)
        out += _image_layouts(c, g)
    # a second audio input beside the first (a codec's features beside its samples): its widths too
    # and, beside raw samples, as many frames as the samples make (one frame per hop of samples)
    for other in (k for k in _AUDIO_KEYS if k != key and k in got and got[k].dim() == 3):
        y = got[other]
        hop = _sample_multiple(c, a) if x.dim() == 2 else None
        ys = _feature_widths(c, a, y)
        if hop and x.shape[-1] // hop not in (0, y.shape[1]):
            n = x.shape[-1] // hop
            ys += [c.randn(y.shape[0], n, w).to(y.device) for w in [y.shape[2]] + [t.shape[2] for t in ys]]
        out += [{**g, other: t} for t in ys for g in out[:2]]
    return out


def _feature_widths(c: _Ctx, a, x: torch.Tensor, stacked: bool = True, mel: bool = True) -> list[torch.Tensor]:
    """(batch, frames, bins) features ``x`` at the other widths a frame may have: ``stacked``, the
    config's projection input and stacked frames (``_stacked_widths``); ``mel``, the usual bin
    counts (``MEL_BINS``) where the config states none."""
    widths = [c.first(a, "feature_projection_input_dim", default=None)] + _stacked_widths(c.model, x.shape[2]) \
        if stacked else []
    if mel and c.first(a, *_MEL_KEYS, default=None) is None:  # the bin count sits in the modelling code
        widths += list(MEL_BINS)
    return [c.randn(x.shape[0], x.shape[1], w).to(x.device)
            for w in dict.fromkeys(int(w) for w in widths if w and int(w) != x.shape[2])]


# frames stacked into one input row: at most this many (low frame rate features stack 2-8)
MAX_STACK = 8


def _stacked_widths(model: nn.Module, bins: int) -> list[int]:
    """Widths of stacked frames (k consecutive frames of ``bins`` as one row: a low-frame-rate
    encoder's input, or frames with their deltas) that the model's first linear layer taking a
    multiple of ``bins`` reads (or first layer norm: XCodec2 normalises its stacked features before
    projecting them): k x bins where 2 <= k <= MAX_STACK."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            width = m.in_features
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            width = m.normalized_shape[0]
        else:
            continue
        if width % bins == 0 and 2 <= width // bins <= MAX_STACK:
            return [width]
    return []


def _runs(model: nn.Module, inputs: dict) -> bool:
    meta = any(t.device.type == "meta" for t in itertools.chain(
        model.parameters(), (v for v in inputs.values() if isinstance(v, torch.Tensor))))
    try:
        with torch.no_grad(), (meta_values() if meta else contextlib.nullcontext()):
            model(**inputs)
        return True
    except Exception:  # noqa: BLE001 - the next layout, or the first one's error at the caller
        return False


_PLACEHOLDERS = (("image", "pixel_values", "get_image_features"),
                 ("video", "pixel_values_videos", "get_video_features"),
                 ("audio", "input_features", "get_audio_features"))


def _feature_count(out) -> int | None:
    """Rows of features a tower returns: (n, t, d) -> n*t, a list of (t, d) -> sum t."""
    if hasattr(out, "pooler_output") and getattr(out, "pooler_output", None) is not None and not isinstance(out, torch.Tensor):
        out = out.pooler_output
    elif hasattr(out, "last_hidden_state") and not isinstance(out, torch.Tensor):
        out = out.last_hidden_state
    if isinstance(out, torch.Tensor):
        return math.prod(out.shape[:-1]) if out.dim() >= 2 else None
    if isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return sum(math.prod(t.shape[:-1]) for t in out)
    return None


def _tower(c: _Ctx, kind: str, method: str):
    """(placeholder id, feature method) of a tower: the model's own, else those of the first model
    inside it that has both (a retrieval or task wrapper around a whole VLM: ColModernVBert's
    ``vlm``), else (None, None)."""
    for m in itertools.chain([c.model], (m for m in c.model.modules() if m is not c.model and hasattr(m, "config"))):
        cfg = getattr(m, "config", None)
        tok = c.first(cfg, f"{kind}_token_id", f"{kind}_token_index", default=None)
        if m is c.model:  # the model's own method may sit on its base model
            fn = getattr(m, method, None) or getattr(getattr(m, "model", None), method, None)
        else:
            fn = getattr(m, method, None)
        if tok is not None and fn is not None:
            return tok, fn
        if m is c.model and (tok is not None or fn is not None):
            return tok, fn  # the model names one of them itself: no search inside
    return None, None


def _fill_placeholders(c: _Ctx, got: dict) -> None:
    """A multimodal model scatters its tower's features into the text where the placeholder ids
    (``image_token_id`` ...) sit: put as many there as the tower makes, so no tower goes unused."""
    if "input_ids" not in got:
        return
    holes, toks = [], {}
    for kind, key, method in _PLACEHOLDERS:
        tok, fn = _tower(c, kind, method)
        if tok is None or key not in c.params or fn is None or key in _absent_inputs(c):
            continue
        toks[kind] = tok
        if key not in got:
            if kind != "image":
                continue
            got[key] = _pixel_values(c).to(c.device)
        try:  # the tower's own extra inputs (image_grid_thw ...) go with its pixels
            extra = {k: v for k, v in got.items() if k != key and k in inspect.signature(fn).parameters
                     and not k.startswith(("input_ids", "attention_mask"))}
            with torch.no_grad(), (meta_values() if c.device.type == "meta" else contextlib.nullcontext()):
                n = _feature_count(fn(got[key], **extra))
        except Exception:  # noqa: BLE001 - the forward will say what is wrong
            n = None
        if not n or n % c.batch:
            continue
        ids = got["input_ids"]
        holes.append(torch.full((c.batch, n // c.batch), int(tok), dtype=ids.dtype, device=ids.device))
    if holes:
        got["input_ids"] = torch.cat([*holes, got["input_ids"]], 1)
        if "attention_mask" in got:
            got["attention_mask"] = torch.ones_like(got["input_ids"])
        if "mm_token_type_ids" in c.params:  # processors' modality map: 0 text, 1 image, 2 video
            kinds = torch.zeros_like(got["input_ids"])
            for i, (kind, _, _) in enumerate(_PLACEHOLDERS[:2]):
                if kind in toks:
                    kinds[got["input_ids"] == int(toks[kind])] = i + 1
            got["mm_token_type_ids"] = kinds


# ---------------------------------------------------------------------------------------------
# forwards on meta that read values
# ---------------------------------------------------------------------------------------------
def _has_meta(args, kwargs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta"
               for t in torch.utils._pytree.tree_leaves((args, kwargs)))


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "meta" else t.to("meta")


def meta_values():
    """A context in which a forward on ``meta`` tensors may read values: a scalar read (``.item()``,
    ``if mask.any():``) answers True / 1, and a data-dependent selection (``nonzero``, boolean-mask
    indexing) keeps every element, as if every mask were all ones. A CPU tensor (an input with
    values, a tensor the forward built without a device) that meets a meta one is taken to meta,
    and a meta tensor moved to the CPU stays on meta. The shapes that follow are the full ones,
    which is what a structural trace needs; no value is computed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class _MetaValues(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                if func is aten._local_scalar_dense.default:
                    return True if x.dtype == torch.bool else (1.0 if x.dtype.is_floating_point else 1)
                if func is aten._grouped_mm.default and x.dim() == 2 and args[1].dim() == 3:
                    # experts' grouped matmul: the meta kernel wants bf16; the shape is (tokens, out)
                    return torch.empty((x.shape[0], args[1].shape[-1]), dtype=x.dtype, device="meta")
                if func is aten._to_copy.default and kwargs.get("device") is not None \
                        and torch.device(kwargs["device"]).type == "cpu":
                    # moved to where an input with values lives (ids.device): it stays on meta
                    return func(x, **{**kwargs, "device": torch.device("meta")})
                if func is aten.masked_select.default:
                    return torch.empty((torch.broadcast_shapes(x.shape, args[1].shape).numel(),), dtype=x.dtype,
                                       device="meta")
            try:
                return func(*args, **kwargs)
            except RuntimeError as e:
                # a tensor the forward made on the CPU (torch.tensor(...) with no device) meeting the
                # meta model: on the model's own device it would be there; the op runs on meta
                if "device" not in str(e) or not _has_meta(args, kwargs):
                    raise
                args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, _to_meta, (args, kwargs))
                return func(*args, **kwargs)

        # nonzero keeps every element through torch's own switch: it reaches the meta kernels that
        # select by a mask inside them (boolean indexing, index_put_ with a mask), below this mode
        def __enter__(self):
            import torch.fx.experimental._config as fx_config

            self._patch = fx_config.patch(meta_nonzero_assume_all_nonzero=True)
            self._patch.__enter__()
            return super().__enter__()

        def __exit__(self, *exc):
            try:
                return super().__exit__(*exc)
            finally:
                self._patch.__exit__(*exc)

    return _MetaValues()
