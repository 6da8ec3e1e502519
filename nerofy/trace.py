"""Frontends: see how the computation uses every parameter.

Tried in order, each recorded per parameter in the plan:

1. ``fx``: ``torch.fx`` symbolic trace (timm's leaf modules and autowrapped functions when the model
   uses timm), with shapes from one forward of the graph on the ``meta`` device when example inputs
   are known. Leaf modules with module rules (Linear, Conv, LSTM, MultiheadAttention ...) are placed
   by those; leaves with other parameters get a second look inside by the recorder (``fx+record``).
2. ``record``: one forward on the ``meta`` device under a ``TorchFunctionMode`` that follows every
   parameter through every torch function. Cheap and exact for the path it sees; needs inputs.
3. ``export``: ``torch.export`` (non-strict) on meta inputs, read at the aten level. Slow (seconds),
   so it comes after the recorder.
4. ``modules``: module-type rules without any graph.

Everything runs on a ``meta`` copy of the model (no memory, no compute); the model is not touched.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import logging
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from . import gains as G
from . import rules as R
from .analysis import (Act, Analyzer, Const, Derived, Finding, _flat, _keep_expr, _pointwise, input_signal, layer_depth,
                       merged_depth)
from .modules import module_findings, module_rule

log = logging.getLogger("nerofy")

FRONTENDS = ("fx", "record", "export", "modules")
# leaf modules whose insides no frontend follows: their parameters are placed by module rules
_OPAQUE = (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)


@dataclass
class Trace:
    """What the frontends found: findings per parameter, and how it went."""

    findings: dict[str, list[Finding]] = field(default_factory=dict)
    frontend: str = ""  # the frontend that placed most parameters
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (frontend, "ok" | error)
    unreached: list[str] = field(default_factory=list)  # parameters no forward reached
    transformed: bool = False  # the traced forward ran a torch.func transform (vmap, grad)
    chain: int = 0  # the most weighted layers in series from the inputs (analysis.Act.depth); 0: unknown


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def param_table(model: nn.Module) -> tuple[dict[int, str], dict[str, tuple[int, ...]]]:
    names, shapes = {}, {}
    for n, p in model.named_parameters():
        names[id(p)] = n
        shapes[n] = tuple(p.shape)
    return names, shapes


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on ``meta`` (no memory)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


@dataclass(frozen=True)
class CallInputs:
    """One call's inputs with keywords, ``model(*args, **kwargs)``: example inputs given as a dict
    whose keys go to a ``forward(*args, **kwargs)`` (peft's PeftModel, wrappers that forward
    everything). A plain tuple of inputs stays a tuple."""
    args: tuple
    kwargs: dict


def split_call(x: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of example inputs: a CallInputs, a tuple/list of positional inputs, or one input."""
    if isinstance(x, CallInputs):
        return tuple(x.args), dict(x.kwargs)
    if isinstance(x, (list, tuple)):
        return tuple(x), {}
    return (x,), {}


def call(model: nn.Module, x: Any) -> Any:
    """``model`` called on example inputs in any of :func:`split_call`'s forms."""
    args, kwargs = split_call(x)
    return model(*args, **kwargs)


def to_meta(x: Any) -> Any:
    if isinstance(x, CallInputs):
        return CallInputs(to_meta(tuple(x.args)), to_meta(dict(x.kwargs)))
    return tree_map(lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t, x)


def _uses_timm(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("timm.") for m in model.modules())


def _timm_hooks(model: nn.Module) -> tuple[tuple[type, ...], tuple[Any, ...]]:
    if not _uses_timm(model):
        return (), ()
    try:
        layers = importlib.import_module("timm.layers")
        return tuple(layers.get_notrace_modules()), tuple(layers.get_notrace_functions())
    except Exception as e:  # timm too old or broken: trace without its hints, and say so
        log.warning("nerofy: timm's fx hints unavailable (%s); tracing without them", e)
        return (), ()


def default_inputs(model: nn.Module) -> tuple | None:
    """Example inputs a model declares: timm's ``pretrained_cfg['input_size']`` (batch 2)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        size = list(cfg["input_size"])
        # a model built with img_size=... keeps the pretrained cfg's size: believe the model
        for m in model.modules():
            hw = getattr(m, "img_size", None)
            if isinstance(hw, int):
                hw = (hw, hw)
            if isinstance(hw, (tuple, list)) and len(hw) == len(size) - 1 and all(isinstance(v, int) for v in hw):
                size[1:] = hw
                break
        return (torch.empty((2, *size), device="meta"),)
    return None


def _fn_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name in ("__get__", "__set__"):
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    if name is None:
        name = getattr(func, "_opname", None) or str(func)
    return name


def _shapes_of(x: Any):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return [tuple(t.shape) for t in x]
    return None


# ---------------------------------------------------------------------------------------------
# the recorder (TorchFunctionMode)
# ---------------------------------------------------------------------------------------------
try:  # torch.func's wrapped tensors (vmap, grad), to follow parameters through them
    _FT = torch._C._functorch
    _FT.is_functorch_wrapped_tensor, _FT.get_unwrapped, _FT.is_batchedtensor, _FT.maybe_get_bdim  # noqa: B018
except AttributeError:  # pragma: no cover - a torch without functorch's C API
    _FT = None


class _Recorder(TorchFunctionMode):
    def __init__(self, an: Analyzer):
        super().__init__()
        self.an = an
        self.values: dict[int, tuple[torch.Tensor, Any]] = {}  # id -> (tensor kept alive, value)
        self.transformed = False  # the forward ran a torch.func transform (vmap, grad)

    def mark(self, t: torch.Tensor, value: Any) -> None:
        self.values[id(t)] = (t, value)

    def resolve(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            hit = self.values.get(id(x))
            if hit is not None and hit[0] is x:
                return hit[1]
            if _FT is not None and _FT.is_functorch_wrapped_tensor(x):
                return self._unwrap(x)
            return Const(tuple(x.shape))
        return x

    def _unwrap(self, x: torch.Tensor) -> Any:
        """A tensor inside a torch.func transform (vmap's batched view of a stacked parameter,
        grad's tracking wrapper): what the wrapped tensor carries, its vmapped dim indexed away
        (each slice is its own set of neurons, as for stacked expert weights)."""
        self.transformed = True
        bdims = []
        t = x
        while _FT.is_functorch_wrapped_tensor(t):
            if _FT.is_batchedtensor(t):
                bdims.append(_FT.maybe_get_bdim(t))
            t = _FT.get_unwrapped(t)
        hit = self.values.get(id(t))
        val = hit[1] if hit is not None and hit[0] is t else None
        if not isinstance(val, (Derived, Act)):
            return Const(tuple(x.shape))
        if isinstance(val, Act) or not bdims:
            return Act(tuple(x.shape)) if isinstance(val, Act) else replace(val, shape=tuple(x.shape))
        origins, removed = {}, dict(val.removed)
        for p, org in val.origins.items():
            org = list(org)
            for b in reversed(bdims):  # the innermost wrapper's dim is removed first
                if b is None or not 0 <= b < len(org):
                    return Const(tuple(x.shape))
                removed[p] = removed.get(p, frozenset()) | org.pop(b)
            origins[p] = tuple(org)
        return Derived(tuple(x.shape), origins, removed, dict(val.gathered))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        weak = not torch.is_grad_enabled()  # see Finding.weak
        name = _fn_name(func)
        if not _in_place(name) and not any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(out)):
            return out  # a metadata or scalar query (is_nested, .item()): reads no values as a layer does
        op = R.canonical(name)
        rargs = R.in_call_order(name, tree_map(self.resolve, args))
        rkw = tree_map(self.resolve, kwargs)
        target = args[0] if args and isinstance(args[0], torch.Tensor) and _in_place(name) else None
        before = len(self.an.findings)
        try:
            val = self.an.call(op, rargs, rkw, _shapes_of(out if out is not None or target is None else target))
        except Exception as e:  # an op the analyzer cannot read must not stop the forward
            val = Const(None)
            for v in _iter_derived((rargs, rkw)):
                self.an.emit(v, "free", op, f"analysis of '{op}' failed: {e}")
        if weak:
            for f in self.an.findings[before:]:
                f.weak = True
        if target is not None and isinstance(val, (Derived, Act, Const)):
            self.mark(target, val)  # x[i] = w returns None; x.add_(w) returns x: either way x now carries w
        if isinstance(out, torch.Tensor) and isinstance(val, (Derived, Act, Const)):
            self.mark(out, val)
        elif isinstance(out, (list, tuple)) and isinstance(val, list):
            for o, v in zip(out, val):
                if isinstance(o, torch.Tensor):
                    self.mark(o, v)
        elif isinstance(out, (list, tuple)) and isinstance(val, (Act, Derived)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    self.mark(o, Act(tuple(o.shape)) if isinstance(val, Act) else Const(tuple(o.shape)))
        return out


def _iter_derived(x):
    from .analysis import _flat
    return [v for v in _flat(x) if isinstance(v, Derived)]


def record(module: nn.Module, args: tuple, kwargs: dict, an: Analyzer, names: dict[int, str],
           skip: set[str] = frozenset()) -> set[str]:
    """Run ``module(*args, **kwargs)`` (meta) under the recorder. Returns the parameters it saw."""
    rec = _Recorder(an)
    for p in module.parameters():
        n = names.get(id(p))
        if n is not None and n not in skip:
            rec.mark(p, an.source(n))
        elif n is not None:
            # placed elsewhere (module rules), but what it computes is a signal, not a constant
            rec.mark(p, Act(tuple(p.shape)))
    for t in [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]:
        rec.mark(t, Act(tuple(t.shape)))
    before = len(an.findings)
    # grad on (meta tensors: no memory), so that what the forward computes under its own no_grad is
    # told apart from its uses
    with torch.enable_grad(), rec:
        module(*args, **kwargs)
    an.transformed = an.transformed or rec.transformed
    return {f.param for f in an.findings[before:]}


# ---------------------------------------------------------------------------------------------
# fx
# ---------------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...], autowrap: tuple[Any, ...]):
        super().__init__(autowrap_functions=autowrap)
        self._leaves = leaves

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if not torch.is_grad_enabled():  # the forward's own no_grad block: not a use (see _Recorder)
            node.meta["nerofy_no_grad"] = True
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._leaves and isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, qualname)


_CONSTANT = (type(None), bool, int, float, str)


def _defaulted_args(model: nn.Module, inputs: tuple | None) -> dict[str, Any] | None:
    """forward() arguments the caller does not pass, at their constant defaults (``mask=None``,
    ``return_loss=False``). Traced as proxies, ``if mask is not None`` would take the branch the
    real call never takes (and the graph then fails on the None); the plan is for the call made
    with ``inputs``, so those arguments are constants."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given = len(inputs) if inputs is not None else sum(1 for p in positional if p.default is p.empty)
    unpassed = positional[given:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
    out = {p.name: p.default for p in unpassed if p.default is not p.empty and isinstance(p.default, _CONSTANT)}
    return out or None


class _ShapeInterp(fx.Interpreter):
    """Runs the graph on meta tensors, keeping every node's output (for shapes) and looking
    inside leaf modules that module rules do not cover."""

    def __init__(self, gm, inside):
        super().__init__(gm)
        self.vals: dict[fx.Node, Any] = {}
        self.inside = inside  # callback(module path, module, args, kwargs)

    def run_node(self, n):
        out = super().run_node(n)
        self.vals[n] = out
        return out

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if self.inside is not None and _needs_inside_look(mod):
            return self.inside(target, mod, args, kwargs)
        return mod(*args, **kwargs)


def _needs_inside_look(mod: nn.Module) -> bool:
    if isinstance(mod, _OPAQUE):
        return False
    for m in mod.modules():
        for pname, _ in m.named_parameters(recurse=False):
            if module_rule(m, pname) is None:
                return True
    return False


def trace_fx(meta_model: nn.Module, inputs: tuple | None, names: dict[int, str], shapes: dict) -> tuple[Analyzer, list[str]]:
    """Symbolic trace + analysis. Returns (analyzer, notes); notes name what did not run."""
    notes = []
    leaves, autowrap = _timm_hooks(meta_model)
    tracer = _Tracer(leaves, autowrap)
    with torch.enable_grad():  # so that create_node sees the forward's own no_grad blocks only
        graph = tracer.trace(meta_model, concrete_args=_defaulted_args(meta_model, inputs))
    gm = fx.GraphModule(tracer.root, graph)
    an = Analyzer("fx", shapes)
    inside_an = Analyzer("fx+record", shapes)
    seen_inside: set[str] = set()

    node_vals: dict[fx.Node, Any] = {}
    if inputs is not None:
        def inside(target, mod, args, kwargs):
            nonlocal seen_inside
            rule_names = _rule_covered(mod, names)
            seen_inside |= record(mod, args, kwargs, inside_an, names, skip=rule_names)
            return mod(*args, **kwargs)

        interp = _ShapeInterp(gm, inside)
        try:
            with torch.no_grad():
                interp.run(*inputs)
            node_vals = interp.vals
        except Exception as e:
            notes.append(f"fx: shapes unknown (a meta forward of the graph failed: {type(e).__name__}: {_short(e)})")
            node_vals = interp.vals  # shapes up to the failure are still good
            inside_an.findings.clear()
            seen_inside = set()

    env: dict[fx.Node, Any] = {}

    def res(a):
        return fx.node.map_arg(a, lambda n: env.get(n, Const(None)))

    weak_from = None  # findings from this index on come from a node made under no_grad (Finding.weak)

    def settle_weak():
        if weak_from is not None:
            for f in an.findings[weak_from:]:
                f.weak = True

    for node in graph.nodes:
        settle_weak()
        weak_from = len(an.findings) if node.meta.get("nerofy_no_grad") else None
        an.where = node.name
        shp = _shapes_of(node_vals.get(node)) if node in node_vals else None
        if node.op == "placeholder":
            env[node] = Act(shp)
        elif node.op == "get_attr":
            obj = _fetch(gm, node.target)
            if isinstance(obj, torch.Tensor) and id(obj) in names:
                env[node] = an.source(names[id(obj)])
            elif isinstance(obj, torch.Tensor):
                env[node] = Const(tuple(obj.shape))
            else:
                env[node] = obj
        elif node.op in ("call_function", "call_method"):
            args, kwargs = res(node.args), res(node.kwargs)
            if node.op == "call_function":
                fn = node.target
                name = _fn_name(fn)
                if fn is getattr and len(args) == 2 and isinstance(args[1], str):
                    name, args = args[1], (args[0],)
                    fn = None
            else:
                name = node.target
                fn = getattr(torch.Tensor, node.target, None)
            op = R.canonical(name)
            if op == "getitem" and isinstance(args[0], (list, tuple)) and isinstance(args[1], int):
                env[node] = args[0][args[1]] if -len(args[0]) <= args[1] < len(args[0]) else Const(None)
                continue
            if node.op == "call_function" and _is_user_function(fn) and node in node_vals \
                    and _iter_derived((args, kwargs)):
                # a wrapped Python function (fx.wrap / timm autowrap): look inside with the recorder
                inside_an.where = node.name
                env[node] = _record_call(inside_an, fn, node, node_vals, env)
                continue
            try:
                env[node] = an.call(op, args, kwargs, shp, fn)
            except Exception as e:
                for v in _iter_derived((args, kwargs)):
                    an.emit(v, "free", op, f"analysis of '{op}' failed: {type(e).__name__}: {_short(e)}")
                env[node] = Const(None)
            if _in_place(name) and node.args and isinstance(node.args[0], fx.Node):
                # y.add_(w) / y += w change y itself: later uses of y's node see what flowed in
                env[node.args[0]] = env[node]
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            args, kwargs = res(node.args), res(node.kwargs)
            for v in _iter_derived((args, kwargs)):
                if isinstance(mod, R_NORM_MODULES):
                    continue
                an.emit(v, "additive", type(mod).__name__, f"fed as input to module {node.target}")
            if isinstance(mod, R_NORM_MODULES) and args and isinstance(args[0], Act):
                an.post_norm(args[0])
            # module rules for what a leaf covers, here in graph order ("first use" means first in forward)
            x = args[0] if args and isinstance(args[0], Act) else None
            leaf = _leaf_rule_findings(node.target, mod, names)
            if x is not None and isinstance(mod, _DIRECT_WEIGHT):
                for f in leaf:  # its weight consumes the module's input directly: that input's signal
                    if f.role == "neuron":
                        f.signal = input_signal(x)
            an.findings.extend(leaf)
            d = _iter_derived((args, kwargs))
            if d and isinstance(mod, R_NORM_MODULES):
                env[node] = an._elementwise(d, shp if isinstance(shp, tuple) else d[0].shape)
            else:
                out = [Act(s) for s in shp] if isinstance(shp, list) else [_leaf_output(mod, x, shp, names)]
                # a leaf with weights is a layer in series (Act.depth); any other keeps its input's depth
                ins = [a for a in _flat((args, kwargs)) if isinstance(a, Act)]
                depth = layer_depth(ins) if any(f.role in ("neuron", "embedding") for f in leaf) else merged_depth(ins)
                for a in out:
                    a.depth = depth
                    an.note_depth(a)
                env[node] = out if isinstance(shp, list) else out[0]
        elif node.op == "output":
            for v in _iter_derived(res(node.args)):
                an.emit(v, "free", "output", "returned by forward without being consumed")
    settle_weak()

    # the recorder's look inside leaf modules and wrapped functions, for what no module rule covers
    an.findings.extend(inside_an.findings)
    an.chain = max(an.chain, inside_an.chain)
    return an, notes


_IN_PLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                       "imatmul", "setitem", "__setitem__"}


def _in_place(name: str) -> bool:
    """``add_``, ``masked_fill_``, ``copy_`` ... and the augmented assignments fx records as operators."""
    return (name.endswith("_") and not name.startswith("_")) or name in _IN_PLACE_OPERATORS


def _is_user_function(fn) -> bool:
    mod = getattr(fn, "__module__", None) or ""
    root = mod.split(".")[0]
    return callable(fn) and bool(mod) and root not in ("torch", "_operator", "operator", "builtins", "math")


def _record_call(an: Analyzer, fn, node: fx.Node, node_vals: dict, env: dict):
    """Re-run one graph call on its meta values under the recorder, each input tensor carrying
    what the graph walk knows of it (parameter-derived, activation or constant)."""
    rec = _Recorder(an)
    for n in node.all_input_nodes:
        t, v = node_vals.get(n), env.get(n)
        if isinstance(t, torch.Tensor) and isinstance(v, (Derived, Act, Const)):
            rec.mark(t, v)
        elif isinstance(t, (list, tuple)) and isinstance(v, (list, tuple)):
            for ti, vi in zip(t, v):
                if isinstance(ti, torch.Tensor) and isinstance(vi, (Derived, Act, Const)):
                    rec.mark(ti, vi)
    args = fx.node.map_arg(node.args, lambda n: node_vals.get(n))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: node_vals.get(n))
    with torch.enable_grad(), rec:  # grad on: the recorder skips only the function's own no_grad blocks
        out = fn(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        v = rec.resolve(out)  # a parameter-derived result (a gathered bias table) keeps flowing
        return v if isinstance(v, Derived) else Act(tuple(out.shape), depth=_depth_of(v))
    if isinstance(out, (list, tuple)):
        return [rec.resolve(o) if isinstance(rec.resolve(o), Derived) else Act(_shapes_of(o), depth=_depth_of(rec.resolve(o)))
                if isinstance(o, torch.Tensor) else o for o in out]
    return Act(None)


def _depth_of(v) -> int | None:
    return v.depth if isinstance(v, Act) else None


R_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# leaf modules whose weight multiplies the module's input itself (so that input's signal is its own)
_DIRECT_WEIGHT = (nn.Linear, nn.modules.conv._ConvNd)


def _leaf_output(mod: nn.Module, x: Act | None, shp, names: dict[int, str]) -> Act:
    """What a leaf module's output is, for the gain and table rules (gains.py)."""
    sig = G.module_signal(mod)
    if sig is not None:
        return Act(shp, sig, x.feature if x is not None else None, from_rows=x is not None and x.rows_scale,
                   expr=_pointwise(sig[0], (x,), dict(sig[1])) if x is not None else None)
    if isinstance(mod, G.PRESERVING_MODULES) and x is not None:
        # same values; a flatten moves dims, so the feature dim is not followed there
        flat = isinstance(mod, (nn.Flatten, nn.Unflatten))
        return _keep_expr(Act(shp, x.signal, None if flat else x.feature, x.tables, x.producer, x.stream, x.from_rows), x)
    if isinstance(mod, _DIRECT_WEIGHT):  # the op rule's output feature dim, as for F.linear / F.conv*
        op = "linear" if isinstance(mod, nn.Linear) else "convolution"
        w = names.get(id(mod.weight))
        return Act(shp, feature=R.output_feature(op, "weight", mod.weight.dim()),
                   producer=frozenset([w]) if w else frozenset(), from_rows=x is not None and x.rows_scale)
    if isinstance(mod, R_NORM_MODULES) and x is not None:
        return Act(shp, feature=x.feature, normed=True)
    if isinstance(mod, nn.Embedding) and id(mod.weight) in names:
        t = frozenset([names[id(mod.weight)]])
        return Act(shp, feature=-1, tables=t, stream=t)
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return Act(shp, G.PROBS)
    return Act(shp)


def _rule_covered(mod: nn.Module, names: dict[int, str]) -> set[str]:
    out = set()
    for m in mod.modules():
        for pname, p in m.named_parameters(recurse=False):
            if isinstance(m, _OPAQUE) or module_rule(m, pname) is not None:
                if id(p) in names:
                    out.add(names[id(p)])
    return out


def _leaf_rule_findings(target: str, mod: nn.Module, names: dict[int, str]) -> list[Finding]:
    out = []
    for mname, m in mod.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            f = module_rule(m, pname)
            if f is None or id(p) not in names:
                continue
            f.param, f.frontend = names[id(p)], "fx"
            f.where = f"{target}.{mname}" if mname else target
            out.append(f)
    return out


def _fetch(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _short(e: Exception, n: int = 160) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s[:n]


# ---------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------
def trace_export(meta_model: nn.Module, inputs: tuple, names: dict[int, str], shapes: dict,
                 skip: set[str] = frozenset(), kwargs: dict | None = None) -> Analyzer:
    ep = torch.export.export(meta_model, tuple(inputs), kwargs=kwargs or None, strict=False)
    to_param = dict(ep.graph_signature.inputs_to_parameters)
    by_name = {n: n for n in shapes}
    canon = {}
    for n, p in meta_model.named_parameters(remove_duplicate=False):
        canon[n] = names.get(id(p), n)
    an = Analyzer("export", shapes)
    env: dict[fx.Node, Any] = {}

    def res(a):
        return fx.node.map_arg(a, lambda n: env.get(n, Const(None)))

    for node in ep.graph.nodes:
        an.where = node.name
        val = node.meta.get("val")
        shp = _shapes_of(val)
        if node.op == "placeholder":
            if node.name in to_param:
                pname = canon.get(to_param[node.name], by_name.get(to_param[node.name]))
                if pname in skip:  # opaque modules (LSTM, MultiheadAttention): module rules place them
                    env[node] = Act(shp)
                else:
                    env[node] = an.source(pname) if pname in shapes else Const(shp)
            elif node.name in ep.graph_signature.user_inputs:
                env[node] = Act(shp)
            else:
                env[node] = Const(shp)
        elif node.op == "call_function":
            name = getattr(node.target, "_opname", None) or _fn_name(node.target)
            name = R.ATEN_RENAMES.get(name, name) if hasattr(node.target, "_opname") else name
            op = R.canonical(name)
            args, kwargs = R.in_call_order(name, res(node.args)), res(node.kwargs)
            if op == "getitem" and isinstance(args[0], (list, tuple)):
                env[node] = args[0][args[1]]
                continue
            try:
                env[node] = an.call(op, args, kwargs, shp)
            except Exception as e:
                for v in _iter_derived((args, kwargs)):
                    an.emit(v, "free", op, f"analysis of '{op}' failed: {_short(e)}")
                env[node] = Const(None)
            if _in_place(name) and node.args and isinstance(node.args[0], fx.Node):
                env[node.args[0]] = env[node]  # (a write into a view of another tensor is not followed)
        elif node.op == "output":
            for v in _iter_derived(res(node.args)):
                an.emit(v, "free", "output", "returned by forward without being consumed")
    return an


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------
def trace(model: nn.Module, example_inputs: tuple | None = None, frontends: tuple[str, ...] = FRONTENDS) -> Trace:
    """Run the frontends in order until one places the model; module rules fill what is left."""
    for f in frontends:
        if f not in FRONTENDS:
            raise ValueError(f"unknown frontend {f!r}; choose from {', '.join(FRONTENDS)}")
    names, shapes = param_table(model)
    out = Trace()
    try:
        meta = meta_copy(model)
    except Exception as e:
        out.attempts.append(("meta-copy", f"{type(e).__name__}: {_short(e)}"))
        meta = None
    real_in, kw = None, {}
    if example_inputs is not None:
        real_in, kw = split_call(example_inputs)
    if meta is not None:
        mnames, _ = param_table(meta)
        names = mnames
        meta.train(model.training)
        inputs = to_meta(real_in) if real_in is not None else default_inputs(meta)
        kw = to_meta(kw)
    else:
        # no meta copy: trace the model itself (fx touches no values), with real inputs if given
        meta, inputs = model, real_in

    an: Analyzer | None = None
    notes: list[str] = []
    opaque = _opaque_params(meta, names)
    for f in frontends:
        if f == "modules":
            break
        if f == "fx" and kw:
            out.attempts.append((f, "skipped: keyword inputs (a symbolic trace takes positional inputs only)"))
            continue
        try:
            if f == "fx":
                an, n = trace_fx(meta, inputs, names, shapes)
                if n and inputs is not None and "record" in frontends[frontends.index("fx") + 1:]:
                    # the graph traced but does not run (fx baked in a branch the inputs do not
                    # take): the recorder follows the real Python forward instead
                    ran = Analyzer("record", shapes)
                    try:
                        record(meta, inputs, kw, ran, names, skip=opaque)
                    except Exception as e:
                        ran = None
                        if example_inputs is not None and meta is not model:
                            # meta cannot run it either (a tensor made on the CPU inside forward,
                            # .item()): one real forward with the user's inputs has every shape
                            try:
                                ran = _record_real(model, example_inputs, shapes, e, notes)
                            except Exception as e2:
                                e = e2
                        if ran is None:
                            n.append(f"record after fx: {type(e).__name__}: {_short(e, 80)}")
                    if ran is not None:
                        out.attempts.append(("fx", "traced, but the graph did not run on meta: " + n[0][4:]))
                        out.attempts.append(("record", "ok"))
                        out.frontend, an = "record", ran
                        break
                notes += n
            elif f == "record":
                if inputs is None:
                    out.attempts.append((f, "skipped: no example inputs"))
                    continue
                an = Analyzer("record", shapes)
                try:
                    record(meta, inputs, kw, an, names, skip=opaque)
                except Exception as e:
                    if example_inputs is None or meta is model:
                        raise
                    # meta tensors cannot answer value questions (.item(), data-dependent shapes):
                    # one real forward instead, with the user's inputs
                    an = _record_real(model, example_inputs, shapes, e, notes)
            elif f == "export":
                if inputs is None:
                    out.attempts.append((f, "skipped: no example inputs"))
                    continue
                an = trace_export(meta, inputs, names, shapes, skip=opaque, kwargs=kw)
            out.attempts.append((f, "ok"))
            out.frontend = f
            break
        except Exception as e:
            out.attempts.append((f, f"{type(e).__name__}: {_short(e)}"))
            an = None
    out.transformed = an is not None and an.transformed
    out.chain = an.chain if an is not None else 0
    for n in notes:
        out.attempts.append(("note", n))
    found: dict[str, list[Finding]] = {n: [] for n in shapes}
    if an is not None:
        for f in an.findings:
            if f.param in found:
                found[f.param].append(f)
    # opaque leaves (LSTM, MultiheadAttention) and whatever no graph reached: module rules
    rest = {n for n, fs in found.items() if not fs}
    if rest:
        mf, _unknown = module_findings(meta, rest, "modules")
        for f in mf:
            if an is not None and f.param not in opaque:
                f.reason += "; not reached by the traced forward"
            found[f.param].append(f)
        if an is not None:
            out.unreached = sorted(n for n in rest if n not in opaque)
    if not out.frontend:
        out.frontend = "modules"
    out.findings = found
    return out


def _record_real(model: nn.Module, example_inputs, shapes: dict, why: Exception, notes: list[str]) -> Analyzer:
    """The recorder over one real forward of ``model`` with the user's inputs, after the meta
    forward failed with ``why`` (noted, with the fallback, when it succeeds)."""
    rnames, _ = param_table(model)
    an = Analyzer("record", shapes)
    real_in, kw = split_call(example_inputs)
    record(model, real_in, kw, an, rnames, skip=_opaque_params(model, rnames))
    notes.append(f"record: meta forward failed ({type(why).__name__}: {_short(why, 80)}); "
                 "recorded one real forward instead")
    return an


def _opaque_params(model: nn.Module, names: dict[int, str]) -> set[str]:
    """Parameters inside opaque modules (children too: MultiheadAttention's out_proj is used by
    F.multi_head_attention_forward, not by its own forward)."""
    out = set()
    for m in model.modules():
        if isinstance(m, _OPAQUE):
            for p in m.parameters():
                if id(p) in names:
                    out.add(names[id(p)])
    return out
