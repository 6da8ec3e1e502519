"""Models from a name: timm architectures (``resnet50``, ``timm:resnet50``) or the user's own code
(``package.module:factory``), never downloading weights; local checkpoints; default inputs.

Nothing here prints: errors are exceptions with one clear line (the CLI turns them into red text).
"""
from __future__ import annotations

import difflib
import importlib
import os
import re
from typing import Any

import torch
from torch import nn


class CliError(Exception):
    """An error the CLI reports as one red line (the traceback only with NEROFY_DEBUG=1)."""


class UnknownModel(CliError):
    pass


def parse_spec(spec: str) -> tuple[str, str]:
    """``'resnet50'`` / ``'timm:resnet50'`` -> ``('timm', 'resnet50')``; ``'torchvision:resnet18'`` ->
    ``('source', 'torchvision:resnet18')``; ``'pkg.mod:factory'`` -> ``('import', 'pkg.mod:factory')``."""
    spec = spec.strip()
    if not spec:
        raise CliError("empty model name")
    if spec.startswith("timm:"):
        return "timm", spec[len("timm:"):]
    if source_spec(spec) is not None:
        return "source", spec
    if ":" in spec:
        return "import", spec
    return "timm", spec


def source_spec(spec: str):
    """The ``cli.sources`` ModelSpec that ``torchvision:NAME`` / ``transformers:NAME`` names (as zoo
    rows do), or None for anything else (``torchvision.models:resnet18`` is an import path)."""
    from . import sources as S

    prefix, _, name = spec.partition(":")
    if prefix not in S.SOURCES or not name or "." in name:
        return None
    if name in S.names(prefix):
        return S.get(prefix, name)
    try:
        if hasattr(importlib.import_module(prefix), name):
            return None  # a factory of the package itself: the import path
    except ImportError:
        pass
    near = closest(name, S.names(prefix), 3)
    raise UnknownModel(f"no {prefix} model {name!r} in nerofy's {prefix} list"
                       + (f"; closest: {', '.join(f'{prefix}:{n}' for n in near)}" if near else ""))


def _timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is in the cli extra
        raise CliError("timm is not installed: pip install 'nerofy[cli]' (or give package.module:factory)") from e
    return timm


def timm_names() -> list[str]:
    return list(_timm().list_models())


def closest(name: str, names: list[str], n: int = 5) -> list[str]:
    """Closest known names: fuzzy matches, then names that contain the query."""
    base = name.split(".")[0]
    out = difflib.get_close_matches(base, names, n=n, cutoff=0.6)
    low = base.lower()
    for cand in names:
        if len(out) >= n:
            break
        if low and low in cand.lower() and cand not in out:
            out.append(cand)
    return out[:n]


def check_timm_name(name: str) -> str:
    """The architecture name (tags like ``.a1_in1k`` allowed), or UnknownModel with suggestions."""
    timm = _timm()
    arch = name.split(".")[0]
    names = timm.list_models()
    if arch in names:
        return name
    near = closest(arch, names)
    hint = f"; closest: {', '.join(near)}" if near else "; see `timm.list_models()`"
    raise UnknownModel(f"unknown model {name!r}{hint}")


def family(name: str) -> str:
    """timm's module that defines the architecture (``resnet``, ``vision_transformer``...)."""
    try:
        return _timm().models.model_entrypoint(name.split(".")[0]).__module__.rsplit(".", 1)[-1]
    except Exception:
        m = re.match(r"[a-z]+", name)
        return m.group(0) if m else name


def parse_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``['num_classes=10', 'drop_rate=0.1', 'act=gelu']`` -> kwargs (JSON values where they parse)."""
    import json

    out: dict[str, Any] = {}
    for it in items or []:
        key, sep, val = it.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--arg needs key=value, got {it!r}")
        try:
            out[key.strip()] = json.loads(val)
        except ValueError:
            out[key.strip()] = val
    return out


def create(spec: str, *, meta: bool = False, kwargs: dict | None = None) -> nn.Module:
    """Build the model named by ``spec`` with random weights (never downloads). ``meta=True`` builds
    it on the ``meta`` device: structure only, no memory, no compute."""
    kind, name = parse_spec(spec)
    kwargs = dict(kwargs or {})
    if kind == "source":
        if kwargs:
            raise CliError(f"{spec} is built from nerofy's fixed config: --arg is not supported for it")
        return source_spec(spec).create(meta=meta)
    if kind == "timm":
        timm = _timm()
        name = check_timm_name(name)
        kwargs["pretrained"] = False
        if meta:
            with torch.device("meta"):
                return timm.create_model(name, **kwargs)
        return timm.create_model(name, **kwargs)
    mod_name, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise UnknownModel(f"cannot import {mod_name!r} (from {spec!r}): no module named {e.name!r}; "
                               "is it on PYTHONPATH?") from e
        raise
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            near = closest(part, [n for n in dir(obj) if not n.startswith("_")], n=3)
            hint = f"; closest: {', '.join(near)}" if near else ""
            raise UnknownModel(f"{mod_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        if meta:
            with torch.device("meta"):
                model = obj(**kwargs)
        else:
            model = obj(**kwargs)
    else:
        raise CliError(f"{spec!r} is a {type(obj).__name__}, not a model factory")
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def input_size(model: nn.Module, override: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """The model's own sample shape (timm's ``pretrained_cfg['input_size']``), or the override."""
    if override:
        return tuple(override)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(s) for s in cfg["input_size"])
    return None


def parse_size(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        size = tuple(int(s) for s in re.split(r"[,x ]+", text.strip()) if s)
    except ValueError:
        raise CliError(f"--input-size wants numbers like 3,224,224, got {text!r}") from None
    if not size or any(s <= 0 for s in size):
        raise CliError(f"--input-size wants positive numbers like 3,224,224, got {text!r}")
    return size


def make_inputs(model: nn.Module, size: tuple[int, ...] | None, batch: int = 2, seed: int = 0) -> tuple:
    """``batch`` random samples (2 by default: BatchNorm in train mode needs more than one)."""
    size = input_size(model, size)
    if size is None:
        raise CliError(f"{type(model).__name__} declares no input size (no pretrained_cfg); "
                       "pass --input-size C,H,W (one sample's shape)")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((batch, *size), generator=g),)


def count_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema", "net", "params")
_ORIG = re.compile(r"^(.*?)(?:^|\.)parametrizations\.([^.]+)\.original$")
_PZ_STATE = re.compile(r"^(.*?)(?:^|\.)parametrizations\.([^.]+)\.(\d+)\.([^.]+)$")  # a parametrization's buffers


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A local state_dict, plain (``{name: tensor}``) or wrapped (``{'state_dict': ...}``,
    ``{'model': ...}``, Lightning / DDP ``module.`` prefixes); never unpickles arbitrary objects."""
    if not os.path.isfile(path):
        raise CliError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CliError("reading .safetensors needs the safetensors package") from e
        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CliError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    for _ in range(3):
        if isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), dict)), None)
            if inner is None:
                break
            sd = inner
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CliError(f"{path} holds no state_dict (a dict of tensors, possibly under 'state_dict' or 'model')")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) or k.endswith("_extra_state")}
    for prefix in ("module.", "model.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def plain_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Rename nerofy-wrapped keys (``x.parametrizations.weight.original``) to plain ones
    (``x.weight``) and drop the parametrizations' own state (``...weight.0._extra_state``, a 0-dim
    tensor or an older dict, or an older ``...weight.0.scale`` buffer), folding a gain into the
    weight. The stored tensors are already balanced (Nero re-projects them after every step), so
    the plain weight is ``scale * original`` and wrapping again reproduces it. (A checkpoint read
    from disk has no model to project it: nerofy.export_state_dict does that for a live model.)
    Returns (state_dict, how many were renamed)."""
    out, scales, n = {}, {}, 0
    for k, v in sd.items():
        m = _ORIG.match(k)
        if m:
            k = f"{m.group(1)}.{m.group(2)}" if m.group(1) else m.group(2)
            n += 1
            out[k] = v
            continue
        m = _PZ_STATE.match(k)
        if m:  # a parametrization's own state: a gain ("scale" buffer, or extra state {"scale": s})
            sc = None
            if m.group(4) == "scale" and isinstance(v, torch.Tensor) and v.numel() == 1:
                sc = float(v)
            elif m.group(4) == "_extra_state" and isinstance(v, dict) and "scale" in v:  # before the gain was a tensor
                sc = float(v["scale"])
            elif m.group(4) == "_extra_state" and isinstance(v, torch.Tensor) and v.numel() == 1:
                sc = float(v)
            elif m.group(4) == "_extra_state" and isinstance(v, torch.Tensor) and v.is_floating_point():
                sc = v  # one gain per neuron (keep="function"), shaped to broadcast onto the weight
            if sc is not None:
                key = f"{m.group(1)}.{m.group(2)}" if m.group(1) else m.group(2)
                scales[key] = scales.get(key, 1.0) * sc
            continue
        out[k] = v
    for k, sc in scales.items():
        if k not in out:
            continue
        if isinstance(sc, torch.Tensor):
            if sc.dim() != out[k].dim() or torch.broadcast_shapes(sc.shape, out[k].shape) != out[k].shape:
                raise CliError(f"{k}: its per-neuron gain of shape {tuple(sc.shape)} does not broadcast onto the "
                               f"weight {tuple(out[k].shape)} (a grouped layout); save a plain export from the live "
                               "model instead (nerofy.export_state_dict(model))")
            out[k] = (out[k].to(sc.dtype) * sc).to(out[k].dtype)
        elif sc != 1.0:
            out[k] = out[k] * sc
    return out, n


def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> dict:
    """Load a plain or nerofy-wrapped state_dict into a plain model. Returns what happened."""
    sd, renamed = plain_keys(read_state_dict(path))
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise CliError(f"checkpoint {path} does not fit the model: "
                       f"{lines[0] if lines else str(e).splitlines()[0]}"
                       + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")) from e
    if strict and (res.missing_keys or res.unexpected_keys):
        parts = []
        if res.missing_keys:
            parts.append(f"{len(res.missing_keys)} missing (e.g. {', '.join(res.missing_keys[:3])})")
        if res.unexpected_keys:
            parts.append(f"{len(res.unexpected_keys)} unexpected (e.g. {', '.join(res.unexpected_keys[:3])})")
        raise CliError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}; --no-strict loads what fits")
    return {"path": path, "tensors": len(sd), "wrapped_keys": renamed,
            "missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}
