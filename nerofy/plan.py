"""The plan: one role per trainable parameter, with its neuron axes, signal gain and reason.

Roles (DESIGN §2):

============ ================================================ =========================== ================
role         what                                             constraint                  optimizer state
============ ================================================ =========================== ================
neuron       contracted with inputs (linear, conv, matmul...) zero-mean, unit-norm/neuron one per neuron
embedding    lookup-table rows                                balanced per row            one per row
gain         multiplies activations (norm weights, scales)    none                        one per element
bias         added, one non-trivial dim                       none                        one per element
additive     added/concatenated: tokens, position tables      balanced per vector         one per vector
free         user override or a documented fallback           none                        one per element
frozen       requires_grad=False                              untouched                   none
============ ================================================ =========================== ================

Tables are balanced as the paper balances every matrix: a lookup table per row, an additive table
per vector along the dim it meets the activation's feature dim on. Tables whose values are added to
attention logits (relative-position biases) are logit biases, one number per head: they stay free.
A neuron fed by an activation ``phi`` records it (``Entry.signal``); its fixed gain is
``1/rms(phi(z))`` (nerofy.gains).
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from . import gains
from .analysis import Finding
from .layout import ELEMENTWISE, NeuronLayout
from .trace import FRONTENDS, CallInputs, Trace, split_call, trace

log = logging.getLogger("nerofy")

ROLES = ("neuron", "embedding", "gain", "bias", "additive", "free", "frozen")
TABLE_ROLES = ("embedding", "additive")
# how to resolve several uses of one parameter: the first role in this order wins
_PRIORITY = {r: i for i, r in enumerate(("neuron", "embedding", "additive", "gain", "bias", "free"))}


@dataclass
class Entry:
    name: str
    shape: tuple[int, ...]
    role: str
    axes: tuple[int, ...] | None = None
    split_axis: int | None = None
    groups: int = 1
    center: bool = True
    fan_in: int | None = None
    op: str = ""
    frontend: str = ""
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    overridden: bool = False
    # neurons: the activation feeding the op's data input when every use agrees (gains.Signal)
    signal: Any = None
    # the fixed gain of a balanced tensor; None: from the signal (nerofy.gains), 1 for tables
    gain: float | None = None
    # tables (embedding, additive): balanced per vector (axes = the vectors, fan-in = the feature dim)
    balanced: bool = False
    # neurons whose output is added to a residual stream that starts as table rows: those tables,
    # and the rms those rows have (set by the plan from the tables' entries; None: not known)
    stream: tuple[str, ...] = ()
    stream_rms: float | None = None
    # neurons whose output is added to a residual sum that a norm takes next (post-norm): gain 1
    post_norm: bool = False
    # wrap(keep="function"): each neuron's fixed gain is its norm in the weights at wrap time
    kept: bool = False

    @property
    def constrained(self) -> bool:
        return self.role == "neuron" or (self.role in TABLE_ROLES and self.balanced)

    def layout(self) -> NeuronLayout | None:
        """The optimizer layout (None for frozen parameters)."""
        if self.role == "frozen":
            return None
        if self.constrained:
            return NeuronLayout(self.axes, self.split_axis, self.groups, center=self.center)
        if self.role == "embedding":
            return NeuronLayout(self.axes, center=False, normalize=False)
        return ELEMENTWISE

    def signal_gain(self) -> float:
        """The fixed gain this tensor gets under ``wrap(scale="signal")`` (see nerofy.gains)."""
        if self.gain is not None:
            return float(self.gain)
        post = self.post_norm and self.stream_rms is None
        g = gains.gain(self.signal) if self.role == "neuron" and isinstance(self.signal, tuple) and not post else 1.0
        if self.role == "neuron" and self.stream_rms is not None:
            g *= self.stream_rms  # a residual branch enters at the scale of the rows its stream starts as
        return g

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


# The longest chain of weighted layers in series whose steps need no cap beyond Nero's own: a step
# turns every layer of a chain at once, so the function a chain of L layers computes turns by about
# the sum of their angles. On plain ReLU MLPs (digits, normalised steps) the best angle per step
# fell as 1/L, the sum staying near 0.25 rad (depths 10-50, docs/results.md §0); Nero's cap (2 lr,
# 0.02 rad) times 12 layers is 0.24 rad, so a chain of L > 12 layers gets the cap times 12 / L.
CHAIN_REF = 12


def chain_factor(chain: int, ref: int | None = CHAIN_REF) -> float:
    """The factor on Nero's cap (``clip``) for a network whose longest chain of layers in series is
    ``chain`` (0: unknown, no factor): ``min(1, ref / chain)``; ``ref=None`` switches it off."""
    if not ref or not chain or chain <= ref:
        return 1.0
    return ref / chain


class Plan:
    """An inspectable, overridable plan. Iterate for entries; ``plan["name"]`` for one.

    ``chain``: the most weighted layers in series from the model's inputs to any activation (a
    layer adds one; a residual sum, gate or concat takes the shortest of what it merges; 0 where no
    graph was traced). ``nerofy.wrap`` shortens Nero's cap on a network whose chain is longer than
    ``CHAIN_REF`` (see :func:`chain_factor`); set it by hand like any plan field."""

    def __init__(self, entries: list[Entry], frontend: str = "", attempts: list | None = None,
                 warnings: list[str] | None = None, chain: int = 0):
        self.entries: dict[str, Entry] = {e.name: e for e in entries}
        self.frontend = frontend
        self.attempts = list(attempts or [])
        self.warnings = list(warnings or [])
        self.chain = int(chain)
        self._refresh_streams()

    def _refresh_streams(self) -> None:
        """Each residual branch's ``stream_rms``: the rms of the table rows its stream starts as,
        sqrt(sum gain^2 / vector length) over the balanced tables there (a bias there adds nothing
        at the start). Unknown (None, no factor) where a table there is unconstrained or absent."""
        for e in self:
            if not e.stream:
                continue
            parts, known = [], e.role == "neuron"
            for t in e.stream:
                te = self.entries.get(t)
                if te is not None and te.role in ("bias", "gain") and not te.constrained:
                    continue
                if te is None or not te.constrained or not te.fan_in:
                    known = False
                    break
                parts.append((te.signal_gain() if not te.stream else 1.0) ** 2 / te.fan_in)
            e.stream_rms = math.sqrt(sum(parts)) if known and parts else None

    # ---- access ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(_no_match(name, self.entries)) from None

    def summary(self) -> dict:
        """Counts and parameter numbers by role, and the share of parameters constrained."""
        counts = {r: 0 for r in ROLES}
        numels = {r: 0 for r in ROLES}
        for e in self:
            counts[e.role] += 1
            numels[e.role] += e.numel()
        total = sum(numels.values())
        trainable = total - numels["frozen"]
        constrained = sum(e.numel() for e in self if e.constrained)  # neurons and balanced tables
        return {
            "tensors": counts,
            "params": numels,
            "total_params": total,
            "balanced_tables": sum(1 for e in self if e.balanced),
            "constrained_share": (constrained / trainable) if trainable else 0.0,
            "frontend": self.frontend,
            "chain": self.chain,
            "warnings": len(self.warnings),
        }

    # ---- overrides ---------------------------------------------------------------------------
    def override(self, pattern: str, role: str | None = None, axis: int | tuple[int, ...] | None = None,
                 center: bool | None = None, gain: float | None = None, balanced: bool | None = None) -> list[str]:
        """Change the role, neuron axes, centring, fixed gain or (for embedding/additive tables)
        balancing of every parameter whose name matches ``pattern`` (exact name or glob).

        ``axis``: the neuron axes (for a balanced table, the axes that index its vectors; by
        default every axis but the last). ``gain``: the fixed gain of a balanced tensor (see
        nerofy.gains; ``wrap(scale="signal")`` uses it). Returns the names changed."""
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown role {role!r}; choose from {', '.join(ROLES)}")
        if gain is not None and not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain must be a positive finite number, got {gain!r}")
        names = [n for n in self.entries if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise ValueError(_no_match(pattern, self.entries))
        for n in names:
            e = self.entries[n]
            new_role = role or e.role
            if balanced and new_role not in TABLE_ROLES:
                raise ValueError(f"{n}: balanced= applies to embedding and additive tables, not role {new_role!r} "
                                 "(a neuron is always balanced; use role='neuron' to constrain another tensor)")
            axes = e.axes if new_role == e.role else None  # a new role starts from its own default axes
            if axis is not None:
                axes = (axis,) if isinstance(axis, int) else tuple(axis)
                nd = len(e.shape)
                if any(not -nd <= a < nd for a in axes):
                    raise ValueError(f"axis {axis} is out of range for {n} of shape {e.shape}")
                axes = tuple(sorted(a % nd for a in axes))
            table_balanced = new_role in TABLE_ROLES and (balanced if balanced is not None else
                                                          e.balanced and new_role == e.role)
            if axes is None and (new_role in ("neuron", "embedding") or table_balanced):
                axes = (0,) if new_role != "additive" else tuple(range(len(e.shape) - 1))
            keep_axes = new_role in ("neuron", "embedding") or table_balanced
            e.role, e.axes, e.overridden = new_role, axes if keep_axes else None, True
            e.balanced = bool(table_balanced)
            if new_role not in ("neuron",):
                e.split_axis, e.groups = None, 1
            if axis is not None:
                e.split_axis, e.groups = None, 1
            if center is not None:
                e.center = bool(center)
            if gain is not None:
                e.gain, e.kept = float(gain), False  # a gain of the user's replaces the trained norms
            e.fan_in = None
            if e.constrained or e.role == "embedding":
                lay = NeuronLayout(e.axes, e.split_axis, e.groups)
                lay.check(e.shape)
                e.fan_in = lay.fan_in(e.shape)
                if e.constrained and e.fan_in <= 1:
                    raise ValueError(f"{n}: fan-in 1 along axes {e.axes}; a balanced neuron would be +-1. "
                                     "Use role='gain' (or balanced=False) instead.")
            e.warnings = []  # they were about the automatic choice the user just replaced
            e.reason = (f"override: role={e.role}" + (f", axes={e.axes}" if e.axes else "")
                        + (", balanced" if e.balanced else "") + (f", gain={e.gain:g}" if e.gain is not None else ""))
        self.warnings = [w for w in self.warnings if not any(w.startswith(f"{n}: ") for n in names)]
        self._refresh_streams()
        return names

    # ---- rendering ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "frontend": self.frontend,
            "chain": self.chain,
            "attempts": [list(a) for a in self.attempts],
            "warnings": self.warnings,
            "summary": self.summary(),
            "entries": [dict(asdict(e), shape=list(e.shape), axes=list(e.axes) if e.axes is not None else None)
                        for e in self],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        entries = []
        for e in d["entries"]:
            e = dict(e)
            e["shape"] = tuple(e["shape"])
            e["axes"] = tuple(e["axes"]) if e.get("axes") is not None else None
            e["stream"] = tuple(e.get("stream", ()))
            if isinstance(e.get("signal"), list):  # JSON lists back to the hashable (op, ((k, v), ...))
                op, kw = e["signal"]
                e["signal"] = (op, tuple((k, v) for k, v in kw))
            entries.append(Entry(**e))
        return cls(entries, d.get("frontend", ""), [tuple(a) for a in d.get("attempts", [])], d.get("warnings", []),
                   d.get("chain", 0))

    def rows(self) -> list[tuple[str, ...]]:
        out = []
        for e in self:
            axes = "" if e.axes is None else ",".join(map(str, e.axes))
            if e.groups > 1:
                axes += f" +{e.groups}g(ax{e.split_axis})"
            g = e.signal_gain() if e.constrained and not e.kept else None
            out.append((e.name, "x".join(map(str, e.shape)) or "scalar", e.role + (" (balanced)" if e.balanced else ""),
                        axes, "" if e.fan_in is None else str(e.fan_in), "yes" if e.constrained and e.center else "",
                        "trained" if e.kept and e.constrained else "" if g is None else f"{g:.3g}", e.op, e.frontend,
                        e.reason))
        return out

    HEADER = ("name", "shape", "role", "axes", "fan-in", "centred", "gain", "op", "frontend", "reason")

    def table(self, max_reason: int = 60) -> str:
        rows = [self.HEADER] + [r[:-1] + (r[-1][:max_reason],) for r in self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        s = self.summary()
        lines.append("")
        lines.append(f"frontend: {self.frontend}; constrained: {s['constrained_share']:.1%} of trainable parameters; "
                     + ", ".join(f"{r}: {c}" for r, c in s["tensors"].items() if c))
        if self.chain:
            lines.append(self.chain_note())
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    def chain_note(self, ref: int | None = CHAIN_REF) -> str:
        """One line on ``chain`` and the cap factor ``nerofy.wrap(chain_ref=ref)`` gives it."""
        f = chain_factor(self.chain, ref)
        return (f"layers in series: {self.chain or 'unknown (no graph)'}"
                + (f" (over {ref}: Nero's cap on a step x {f:.3g})" if f < 1 else ""))

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        s = self.summary()
        return f"Plan({len(self)} parameters, frontend={self.frontend!r}, constrained={s['constrained_share']:.1%})"


def _no_match(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See plan.entries for the names."
    return f"no parameter matches {name!r}.{hint}"


# ---------------------------------------------------------------------------------------------
# building a plan
# ---------------------------------------------------------------------------------------------
def make_plan(model: nn.Module, example_inputs=None, frontends: tuple[str, ...] = FRONTENDS) -> Plan:
    """Trace ``model`` and give every parameter a role (see :func:`nerofy.plan`)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"nerofy.plan needs a torch.nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters: nothing for nerofy to do")
    if not any(p.requires_grad for p in params.values()):
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
    if example_inputs is not None:
        example_inputs = positional_inputs(model, example_inputs)
    try:
        tr = trace(model, example_inputs, frontends)
    except Exception:
        if example_inputs is not None:
            _check_inputs(model, example_inputs)  # inputs that do not fit: that clear error instead
        raise
    if example_inputs is not None and tr.frontend not in _RAN_INPUTS:
        # no frontend ran the forward with these inputs (each meta forward of a big model costs
        # seconds, so the check runs only here): inputs that do not fit get one clear error
        _check_inputs(model, example_inputs)
    entries, warnings = [], []
    unreached = set(tr.unreached)
    for name, p in params.items():
        e = _resolve(name, tuple(p.shape), tr.findings.get(name, []))
        if e.frontend == "" and name in unreached and tr.transformed:
            # the forward ran a torch.func transform: a parameter used only through one the trace
            # does not follow (a custom function transform) is not seen; "not used" could be false
            e.reason = (f"not reached by the {tr.frontend} trace, whose forward ran a torch.func transform (vmap, "
                        "grad) that may hide its use; no module rule knows it")
            e.warnings = ["not reached by the trace through a torch.func transform (it may still be used): left "
                          "unconstrained (free); set its role with plan.override"]
        elif e.frontend == "" and name in unreached:
            # traced, but this forward never touched it (an optional input's branch, an unused head)
            e.reason = f"not used by the {tr.frontend} trace's forward and no module rule knows it"
            e.warnings = [f"not used by the forward with these inputs: left unconstrained (free); pass inputs "
                          f"that use it, or set its role with plan.override"]
        if not p.requires_grad:
            e.reason = f"requires_grad=False (would be {e.role})"
            e.role, e.warnings = "frozen", []
        entries.append(e)
        warnings += [f"{name}: {w}" for w in e.warnings]
    fallback = [e.name for e in entries if e.frontend == "modules" and e.role != "frozen"
                and (tr.frontend == "modules" or e.name in unreached)]
    unplaced = [e.name for e in entries if e.frontend == "" and e.role != "frozen"]
    failed = [f"{f} ({msg})" for f, msg in tr.attempts if msg != "ok" and f != "note"]
    if fallback and tr.frontend != "modules":
        warnings.append(f"{len(fallback)} parameters not reached by the {tr.frontend} trace were placed by module "
                        f"rules: {_names(fallback)}")
    if tr.frontend == "modules" and fallback:
        warnings.insert(0, "no frontend traced the model" + (f" [{'; '.join(failed)}]" if failed else "")
                        + f"; {len(fallback)} parameters placed by module rules: {_names(fallback)}")
    unused = [n for n in unplaced if n in unreached]
    if unused and tr.transformed:
        warnings.append(f"{len(unused)} parameters were not reached by the trace, whose forward ran a torch.func "
                        f"transform (vmap, grad) that may hide their use; they stay unconstrained ('free'): "
                        f"{_names(unused)}")
    elif unused:
        warnings.append(f"{len(unused)} parameters are not used by the forward with these inputs and stay "
                        f"unconstrained ('free'): {_names(unused)}")
    if len(unused) < len(unplaced):
        rest = [n for n in unplaced if n not in unreached]
        warnings.append(f"{len(rest)} parameters had no rule anywhere and stay unconstrained ('free'): "
                        f"{_names(rest)}")
    for w in warnings[:1] if tr.frontend == "modules" else []:
        log.warning("nerofy: %s", w)
    uncentred = [e.name for e in entries if e.constrained and not e.center and e.fan_in == NO_FREEDOM_CENTRED]
    if uncentred:
        warnings.append(f"{len(uncentred)} tensors of fan-in 2 are normalised without centring (a centred unit "
                        f"vector of length 2 can only be +-(1, -1)/sqrt(2) and never moves): {_names(uncentred)}")
    notes = [msg for f, msg in tr.attempts if f == "note"]
    warnings += notes
    return Plan(entries, tr.frontend, tr.attempts, warnings, tr.chain)


def _names(ns: list[str], n: int = 8) -> str:
    return ", ".join(ns[:n]) + (f" and {len(ns) - n} more" if len(ns) > n else "")


# torch's message when BatchNorm in training mode gets one value per channel (batch 1 after pooling)
BN_SINGLE_VALUE = "more than 1 value per channel"


def _input_module(model: nn.Module) -> nn.Module:
    """The module whose forward takes the inputs: through torch.compile, (Distributed)DataParallel."""
    inner = model
    while True:
        if isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            inner = inner._orig_mod
        elif isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = inner.module
        else:
            return inner


def _forward_signature(model: nn.Module) -> inspect.Signature:
    """The signature of the forward that takes the inputs."""
    return inspect.signature(_input_module(model).forward)


def _is_wrapped(model: nn.Module) -> bool:
    """Whether the forward that takes the inputs is a decorator's wrapper (``functools.wraps``:
    its signature is the wrapped function's, its call is the wrapper's)."""
    return hasattr(_input_module(model).forward, "__wrapped__")


def _unnamed_keys_hint(model: nn.Module, kwargs: dict) -> str:
    """Where keyword inputs went to ``**kwargs`` and the call failed: the keys forward does not
    name, with close names (a typo of ``input_ids`` reaches the model as an unknown keyword)."""
    try:
        sig = _forward_signature(model)
    except (TypeError, ValueError):
        return ""
    named = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in kwargs if k not in named]
    if not unknown:
        return ""
    close = difflib.get_close_matches(unknown[0], named, n=3, cutoff=0.5)
    return (f" Key(s) {', '.join(map(repr, unknown))} are not named parameters of forward (they went to **kwargs)"
            + (f"; close: {', '.join(close)}" if close else "") + ".")


def positional_inputs(model: nn.Module, example_inputs) -> tuple | CallInputs:
    """Example inputs as one call: a tuple/list is the positional inputs, a mapping (a dict, a
    tokenizer's BatchEncoding) is keyword inputs, ``model(**example_inputs)``, bound to
    ``forward``'s named parameters as a positional tuple (omitted ones take their defaults), or
    kept as keywords (:class:`CallInputs`) where keys are keyword-only or go to ``**kwargs``;
    anything else is the one positional input. A forward that takes a dict positionally gets it
    as ``(batch,)``."""
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    if not isinstance(example_inputs, Mapping):
        return (example_inputs,)
    sig = _forward_signature(model)
    params = list(sig.parameters.values())
    kinds = {p.kind for p in params}
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = [k for k in example_inputs if k not in named]
    if extra:
        kwonly = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
        unknown = [k for k in extra if k not in kwonly]
        if not unknown or inspect.Parameter.VAR_KEYWORD in kinds:
            # keyword-only parameters, or a forward(*args, **kwargs) that hands them on (peft's
            # PeftModel): the call is model(**example_inputs), as the user wrote it
            missing = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                       and p.default is p.empty and p.name not in example_inputs]
            if missing:
                raise ValueError(f"example_inputs lacks {missing[0]!r}, which {type(model).__name__}.forward{sig} "
                                 "requires; add it to the dict")
            return CallInputs((), dict(example_inputs))
        close = difflib.get_close_matches(unknown[0], named + sorted(kwonly), n=3, cutoff=0.5)
        raise ValueError(f"example_inputs key(s) {', '.join(map(repr, unknown))} name no parameter of "
                         f"{type(model).__name__}.forward{sig}"
                         + (f" (close: {', '.join(close)})" if close else "")
                         + "; give forward's parameter names as keys (a forward that takes the dict itself gets "
                         "it as (batch,))")
    last = max((named.index(k) for k in example_inputs), default=-1)
    for p in params[: last + 1]:
        if p.name not in example_inputs and p.default is p.empty:
            raise ValueError(f"example_inputs lacks {p.name!r}, which {type(model).__name__}.forward{sig} "
                             "requires; add it to the dict")
    if _is_wrapped(model):
        # a decorated forward (transformers' merge_with_config_defaults) takes (*args, **kwargs)
        # and may inject a keyword itself: a default bound positionally then arrives twice ("got
        # multiple values"). The call stays as the user wrote it: the given keys that lead forward's
        # parameters positionally, the rest as keywords, no default filled in between
        lead = 0
        while lead < len(named) and (named[lead] in example_inputs or params[lead].kind == params[lead].POSITIONAL_ONLY):
            lead += 1
        if lead <= last:
            head = tuple(example_inputs[p.name] if p.name in example_inputs else p.default for p in params[:lead])
            return CallInputs(head, {k: v for k, v in example_inputs.items() if k not in named[:lead]})
    # every parameter up to the last given one is given or has a default (checked above)
    return tuple(example_inputs[p.name] if p.name in example_inputs else p.default for p in params[: last + 1])


# frontends whose success means the forward ran with the example inputs (on meta, or for real
# where meta could not): those inputs fit, and _check_inputs would only run that forward again
_RAN_INPUTS = ("record", "export")


def _check_inputs(model: nn.Module, example_inputs) -> None:
    """Example inputs must run through the model (on meta, else for real); one clear error if not."""
    from .trace import meta_copy, to_meta

    try:
        meta = meta_copy(model)
    except Exception:
        meta = model

    args, kwargs = split_call(example_inputs)
    try:
        with torch.no_grad():
            meta(*to_meta(args), **to_meta(kwargs))
        return
    except Exception:
        pass  # the model may not run on meta at all (.item(), data-dependent shapes): try for real
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = [tuple(a.shape) if hasattr(a, "shape") else type(a).__name__ for a in args] + [
            f"{k}={tuple(a.shape) if hasattr(a, 'shape') else type(a).__name__}" for k, a in kwargs.items()]
        hint = ("BatchNorm in training mode needs more than one value per channel: pass a batch of at least 2"
                if BN_SINGLE_VALUE in msg else "Pass inputs the model's forward accepts")
        raise ValueError(f"example_inputs of shapes {shapes} do not fit {type(model).__name__}: "
                         f"{type(e).__name__}: {msg[:200]}. {hint}.{_unnamed_keys_hint(model, kwargs)}") from e


def _key(f: Finding):
    return (f.role, f.axes, f.split_axis, f.groups)


def _resolve(name: str, shape: tuple[int, ...], findings: list[Finding]) -> Entry:
    """Merge the uses of one parameter into one entry, deterministically."""
    # uses under no_grad (a power iteration) count only where no other use does (every use inside
    # a custom autograd.Function's forward or a reentrant checkpoint is one)
    findings = [f for f in findings if not f.weak] or findings
    streams = [f for f in findings if f.role == "stream"]  # where its output goes, not a use
    post = [f for f in findings if f.role == "postnorm"]  # likewise
    findings = [f for f in findings if f.role not in ("stream", "postnorm", "stream-sum")]
    if not findings:
        return Entry(name, shape, "free", reason="no frontend reached it and no module rule knows it",
                     warnings=["no rule: left unconstrained (free)"])
    ranked = sorted(findings, key=lambda f: _PRIORITY.get(f.role, 99))  # stable: graph order within a role
    best = ranked[0]
    e = Entry(name, shape, best.role, best.axes, best.split_axis, best.groups, op=best.op,
              frontend=best.frontend, reason=best.reason)
    roles = {f.role for f in findings}
    same_role = [f for f in findings if f.role == best.role]
    layouts = {_key(f) for f in same_role}
    if len(layouts) > 1:
        alts = "; ".join(sorted({f"axes {f.axes} by {f.op}" for f in same_role}))
        e.warnings.append(f"uses disagree on the neuron axes ({alts}); chose axes {best.axes} ({best.op}, first use)")
    others = sorted(roles - {best.role})
    if others:
        if best.role == "neuron" and others == ["embedding"] and \
                all(f.axes == best.axes for f in findings if f.role == "embedding"):
            e.reason += "; tied with an embedding along the same axis"
        elif set(others) <= {"free"}:
            why = "; ".join(sorted({f.reason for f in findings if f.role == "free"}))
            e.warnings.append(f"also used where no rule applies ({why}); kept role {best.role}")
        else:
            e.warnings.append(f"also used as {', '.join(others)}; chose {best.role} (priority order)")
    if e.role == "free" and e.frontend:
        # reached by the trace, but every use is one no rule places: say so (the README promises a
        # warning for every free parameter the user did not choose)
        e.warnings.append(f"left unconstrained (free): {e.reason}; set its role with plan.override if it "
                          "should be constrained")
    if e.role == "additive":
        _table_vectors(e, findings)
    if e.role in ("neuron", "embedding") or e.balanced:
        lay = NeuronLayout(e.axes, e.split_axis, e.groups)
        try:
            lay.check(shape)
        except ValueError as err:
            e.role, e.axes, e.reason, e.balanced = "free", None, f"found layout does not fit: {err}", False
            e.warnings.append(e.reason)
            return e
        e.fan_in = lay.fan_in(shape)
        if e.fan_in <= 1 and e.role == "neuron":
            e.reason = (f"fan-in 1 ({e.reason}): a balanced neuron could only be +-1, so it is a per-element gain")
            e.role, e.axes, e.split_axis, e.groups = "gain", None, None, 1
        elif e.role == "neuron":
            _signal(e, [f for f in findings if f.role == "neuron"])
            _stream(e, streams)
            _post_norm(e, post)
        elif e.role == "embedding" and e.fan_in > 1:
            _table_rows(e, findings)
        elif e.fan_in <= 1:
            e.balanced, e.axes, e.fan_in = False, None, None
        if e.constrained and e.center and e.fan_in == NO_FREEDOM_CENTRED:
            e.center = False
            e.reason += (f"; fan-in {e.fan_in}: a centred unit-norm vector could only be +-(1, -1)/sqrt(2), "
                         "no freedom to learn, so it is normalised without centring")
    return e


# a centred unit-norm vector of this length has no degree of freedom (2 points); fan-in 1 has none
# even uncentred (+-1) and is a gain
NO_FREEDOM_CENTRED = 2


def _signal(e: Entry, uses: list[Finding]) -> None:
    """The activation feeding the neuron's inputs, when every use agrees (its gain: nerofy.gains)."""
    sigs = {f.signal for f in uses}
    if len(sigs) == 1 and isinstance(next(iter(sigs)), tuple):
        e.signal = next(iter(sigs))
        what = (f"the pointwise function {gains.describe(e.signal)} of a pre-activation z"
                if e.signal[0] == gains.POINTWISE else f"{gains.describe(e.signal)} output")
        e.reason += f"; input is {what}: gain {e.signal_gain():.3g} = 1/rms of it (He's gain for ReLU)"
    elif len(sigs) > 1:
        e.reason += "; its uses see different inputs: gain 1"


def _stream(e: Entry, streams: list[Finding]) -> None:
    """A residual branch (its output added to a stream that starts as table rows) gets its gain
    times those rows' rms: unit-norm rows of length d have rms 1/sqrt(d), a balanced layer's output
    rms ~1, and a branch at rms 1 would drown the rows (the tokens) from the first block on."""
    tables = sorted({t for f in streams for t in f.stream})
    if tables:
        e.stream = tuple(tables)
        e.reason += (f"; its output is added to a residual stream that starts as rows of {', '.join(tables)}: "
                     "gain times their rms, so it enters at the stream's starting scale")


def _post_norm(e: Entry, post: list[Finding]) -> None:
    """The last layer of a post-norm branch (``norm(x + f(x))``, BERT): no signal factor. The norm
    renormalises the sum, so there is no signal to carry through later layers; the branch's gain
    only sets its share of the sum, and with its signal factor (GELU's 1.53) the branch enters at
    the stream's full rms. Gain 1 (the paper's unit norm) measured better (docs/results.md)."""
    if not post or e.signal is None:
        return
    e.post_norm = True
    e.reason += ("; its output is added to a residual sum a norm takes next (post-norm): gain 1, the signal "
                 "factor has no later layer to serve there")


def _table_rows(e: Entry, findings: list[Finding]) -> None:
    """A lookup table: balanced per row as the paper balances every matrix, unless its rows are added
    to attention logits (a logit bias: one number per head, nothing to normalise)."""
    if any(f.meets == "logits" for f in findings):
        e.reason += "; its rows are added to attention logits: a logit bias, left unconstrained"
        return
    e.balanced = True
    e.reason += "; balanced per row (zero-mean, unit-norm vectors, as the paper balances every table)"


def _table_vectors(e: Entry, findings: list[Finding]) -> None:
    """An additive table (position embeddings, class/register tokens): balanced per vector along
    the dim it meets the activation's feature dim on, as the paper balances every matrix."""
    uses = [f for f in findings if f.role == "additive"]
    if any(f.meets == "logits" for f in uses):
        e.reason += "; added to attention logits: a logit bias, left unconstrained"
        return
    axes = {f.vector_axis for f in uses}
    if len(axes) != 1 or None in axes:
        e.reason += "; no single feature dim found for its vectors: left unconstrained"
        return
    va = axes.pop()
    if len(e.shape) < 2 or e.shape[va] <= 1:
        return
    e.balanced, e.axes = True, tuple(d for d in range(len(e.shape)) if d != va)
    e.reason += f"; balanced per vector along dim {va} (the feature dim it is added to)"
