"""Signal gains: the fixed gain of a balanced layer, from the activation that feeds it.

A balanced neuron (zero-mean, unit-norm incoming weights) maps inputs of variance ``q`` to an
output of variance about ``q``. A nonlinearity between two layers shrinks the signal: ReLU of a
unit Gaussian has second moment 1/2 (variance 0.34), so a plain ReLU stack of balanced layers loses
most of its signal within a few layers (the paper's 100-layer MLP had ReLU x sqrt(2) in its
architecture for this reason). A layer whose input is ``phi(z)``, ``z ~ N(0, 1)``, therefore gets
the fixed gain

    1 / rms(phi(z)) = 1 / sqrt(E[phi(z)^2])

computed numerically from ``phi`` itself (``F.relu``, ``F.gelu``, ...): He et al.'s gain, sqrt(2)
for ReLU, for every activation the table names. A layer whose input is anything else (the model's
inputs, a norm's output, a residual sum, attention) keeps gain 1. Networks that normalise each
layer's output (BatchNorm after the layer) are scale-invariant there: the gain changes nothing in
their function or in Nero's angular steps.

Why the second moment and not the variance: centred neurons remove the mean of their input, so
``1 / std(phi(z))`` (1.71 for ReLU) is the gain that keeps the variance exactly. Measured on
20-layer ReLU MLPs on digits (10 seeds, docs/results.md), it trained clearly worse (mean accuracy
0.81, worst seed 0.57) than sqrt(2) (0.94, worst 0.92); ``gain(sig, centred=True)`` computes it
for comparison.

The analysis tags activations with the op that produced them (``Act.signal``, see analysis.py);
this module holds the table of activations as data and the arithmetic.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# op -> (function, names of its parameters after the input, in call order)
ACTIVATIONS: dict[str, tuple] = {
    "relu": (F.relu, ()),
    "relu6": (F.relu6, ()),
    "leaky_relu": (F.leaky_relu, ("negative_slope",)),
    "elu": (F.elu, ("alpha",)),
    "celu": (F.celu, ("alpha",)),
    "selu": (F.selu, ()),
    "gelu": (F.gelu, ("approximate",)),
    "silu": (F.silu, ()),
    "mish": (F.mish, ()),
    "hardswish": (F.hardswish, ()),
    "hardsigmoid": (F.hardsigmoid, ()),
    "hardtanh": (F.hardtanh, ("min_val", "max_val")),
    "softplus": (F.softplus, ("beta", "threshold")),
    "tanh": (torch.tanh, ()),
    "sigmoid": (torch.sigmoid, ()),
    "softsign": (F.softsign, ()),
}

# ops that move values without changing their distribution: an activation's tag survives them
PRESERVING = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
              "native_dropout", "identity"}

# activation modules (leaves for fx: it sees the module call, not the function): class -> op; the
# module keeps the function's parameters as attributes of the same names (ACTIVATIONS)
MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.CELU: "celu",
    nn.SELU: "selu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.Hardtanh: "hardtanh", nn.Softplus: "softplus", nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid", nn.Softsign: "softsign",
}
PRESERVING_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
                      nn.Flatten, nn.Unflatten)

Signal = tuple  # (op, ((name, value), ...)): hashable, printable

SIMILARITY = "similarity"  # a product of two activations (attention logits): what logit-bias tables meet
PROBS = "probs"  # a softmax's output: its product with values is features, not logits


def activation_signal(op: str, args: tuple, kwargs: dict) -> Signal | None:
    """The tag of ``op(args, kwargs)``'s output if ``op`` is an activation of the table, else None."""
    if op not in ACTIVATIONS:
        return None
    _, names = ACTIVATIONS[op]
    vals = []
    for i, n in enumerate(names):
        if n in kwargs:
            v = kwargs[n]
        elif len(args) > i + 1:
            v = args[i + 1]
        else:
            continue
        if not isinstance(v, (int, float, str, bool)):
            return None  # a tensor-valued slope: no fixed gain
        vals.append((n, v))
    return (op, tuple(vals))


def module_signal(mod: nn.Module) -> Signal | None:
    op = MODULES.get(type(mod))  # the exact class: a subclass may compute something else
    if op is None:
        return None
    return (op, tuple((a, getattr(mod, a)) for a in ACTIVATIONS[op][1] if hasattr(mod, a)))


def describe(sig: Signal) -> str:
    op, kw = sig
    if op == POINTWISE:
        return dict(kw)["expr"]
    return f"{op}({', '.join(f'{k}={v}' for k, v in kw)})" if kw else op


# elementwise maths on one pre-activation z (gelu_new written as 0.5 z (1 + tanh(...)), x sigmoid(x),
# squared ReLU): the analysis composes these and evaluates the composite on the quadrature grid
POINTWISE = "pointwise"
UNARY_FNS: dict[str, Callable] = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf, "exp": torch.exp, "neg": torch.neg,
    "abs": torch.abs, "square": torch.square, "sin": torch.sin, "cos": torch.cos, "log1p": torch.log1p,
    "expm1": torch.expm1, "softplus": F.softplus, "logsigmoid": F.logsigmoid, "reciprocal": torch.reciprocal,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
}
BINARY_FNS: dict[str, Callable] = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
                                   "pow": torch.pow, "maximum": torch.maximum, "minimum": torch.minimum}
LINEAR_OPS = {"add", "sub", "neg"}  # with numbers: affine, no nonlinearity of their own (mul/div by a number too)


@lru_cache(maxsize=1)
def _grid() -> tuple[torch.Tensor, torch.Tensor]:  # read only: shared by every quadrature
    z = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    return z, torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])


def pointwise_signal(fn: Callable, text: str) -> Signal | None:
    """The signal of ``fn(z)`` (a composite of elementwise ops on one pre-activation), with its
    moments; None if it is not finite on the grid."""
    z, w = _grid()
    with torch.no_grad():
        y = fn(z)
    if not isinstance(y, torch.Tensor) or y.shape != z.shape or not bool(torch.isfinite(y).all()):
        return None
    mean, second = float((w * y).sum()), float((w * y * y).sum())
    return (POINTWISE, (("expr", text), ("mean", round(mean, 9)), ("second", round(second, 9))))


@lru_cache(maxsize=256)
def moments(sig: Signal) -> tuple[float, float]:
    """(mean, second moment) of ``phi(z)`` for ``z ~ N(0, 1)``, by quadrature on a fine grid."""
    op, kw = sig
    if op == POINTWISE:
        d = dict(kw)
        return float(d["mean"]), float(d["second"])
    fn, _ = ACTIVATIONS[op]
    z, w = _grid()
    y = fn(z, **dict(kw))
    return float((w * y).sum()), float((w * y * y).sum())


def gain(sig: Signal | None, centred: bool = False) -> float:
    """The fixed gain of a balanced layer whose input is ``phi(z)``: ``1 / rms(phi(z))`` (the
    default), or ``1 / std(phi(z))`` with ``centred=True`` (see the module docstring)."""
    if not isinstance(sig, tuple):
        return 1.0
    mean, second = moments(sig)
    var = second - mean * mean if centred else second
    if not var > 1e-12:
        return 1.0  # a (near-)constant activation: no scale to restore
    return 1.0 / math.sqrt(var)
