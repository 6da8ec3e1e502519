"""Module-level rules: for leaf modules whose insides a graph does not show (nn.LSTM,
nn.MultiheadAttention, ...), and as the last fallback when no frontend traces the model.

Rules are data: (module class, parameter-name pattern) -> role and neuron layout. A parameter of a
class with no rule gets none here (the caller decides, and says so).
"""
from __future__ import annotations

import re

from torch import nn

from .analysis import Finding

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)

# (classes, name regex, role, axes); axes None for non-neuron roles. First match wins.
MODULE_RULES: list[tuple[tuple[type, ...], str, str, tuple[int, ...] | None]] = [
    ((nn.Linear, nn.Bilinear), r"weight", "neuron", (0,)),
    ((nn.Linear, nn.Bilinear), r"bias", "bias", None),
    ((nn.Embedding, nn.EmbeddingBag), r"weight", "embedding", (0,)),
    (_NORMS, r"weight", "gain", None),
    (_NORMS, r"bias", "bias", None),
    ((nn.PReLU,), r"weight", "gain", None),
    ((nn.MultiheadAttention,), r"in_proj_weight|[qkv]_proj_weight", "neuron", (0,)),
    ((nn.MultiheadAttention,), r"in_proj_bias", "bias", None),
    ((nn.MultiheadAttention,), r"bias_[kv]", "additive", None),
    ((nn.RNNBase, nn.RNNCellBase), r"weight_(ih|hh|hr)(_l\d+)?(_reverse)?", "neuron", (0,)),
    ((nn.RNNBase, nn.RNNCellBase), r"bias_(ih|hh)(_l\d+)?(_reverse)?", "bias", None),
]


def module_rule(module: nn.Module, pname: str) -> Finding | None:
    """The module rule for ``module``'s own parameter ``pname`` (a Finding without a name), or None."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if pname == "bias":
            return Finding("", "bias", op=type(module).__name__, reason="bias of a convolution")
        if pname == "weight":
            if module.transposed:
                g = module.groups
                return Finding("", "neuron", (1,), 0 if g > 1 else None, g, op=type(module).__name__,
                               reason="transposed-conv weight (in, out/g, *k): output channel is axis 1")
            return Finding("", "neuron", (0,), op=type(module).__name__, reason="conv weight (out, in/g, *k)")
    for classes, pattern, role, axes in MODULE_RULES:
        if isinstance(module, classes) and re.fullmatch(pattern, pname):
            return Finding("", role, axes, op=type(module).__name__, reason=f"{pname} of {type(module).__name__}")
    return None


def module_findings(model: nn.Module, names: set[str] | None, frontend: str) -> tuple[list[Finding], list[str]]:
    """Findings from module rules for the parameters in ``names`` (all if None).

    Returns (findings, names with no rule).
    """
    out, unknown = [], []
    seen = set()
    canon = {id(p): n for n, p in model.named_parameters()}  # tied parameters: first name wins
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = canon.get(id(p), f"{mname}.{pname}" if mname else pname)
            if full in seen or (names is not None and full not in names):
                continue
            seen.add(full)
            f = module_rule(mod, pname)
            if f is None:
                unknown.append(full)
                continue
            f.param, f.frontend, f.where = full, frontend, mname
            out.append(f)
    return out, unknown
