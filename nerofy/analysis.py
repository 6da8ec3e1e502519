"""Follow parameters through ops and turn each use into a Finding (role + neuron axes).

Frontends feed :class:`Analyzer` one call at a time with the canonical op name (see rules.py) and
arguments already resolved to the values below. The analyzer is frontend-agnostic: fx, the
function-mode recorder and torch.export all share it, so a rule is written once.

* :class:`Derived` — a tensor computed from parameters by views or elementwise maths; for every
  parameter it remembers which parameter dims feed each of its dims.
* :class:`Act` — depends on the model's inputs (an activation).
* :class:`Const` — neither (buffers, constants, tensors made inside forward).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from . import gains as G
from . import rules as R

Origins = tuple[frozenset, ...]  # per tensor dim: the parameter dims feeding it


@dataclass
class Derived:
    shape: tuple[int, ...] | None
    origins: dict[str, Origins]
    removed: dict[str, frozenset] = field(default_factory=dict)  # param dims indexed away
    gathered: dict[str, frozenset] = field(default_factory=dict)  # param dims indexed by data
    # param dims summed in a product of parameters (the r of B @ A): the consumer puts them on the
    # side of its contraction the parameter does not occupy (B's fan-in, A's neurons)
    contracted: dict[str, frozenset] = field(default_factory=dict)
    # roles of parameters combined with data-picked rows (E[idx] + P: P "additive"), given to them
    # if the result turns out to be data rather than a weight
    pending: dict[str, str] = field(default_factory=dict)


_UIDS = itertools.count()


@dataclass
class Act:
    shape: tuple[int, ...] | None = None
    # what the signal is, for the gains and table rules (see gains.py): the activation function that
    # produced it (or gains.SIMILARITY for a product of two activations: attention logits)
    signal: Any = None
    # the dim (negative: from the end) holding the neurons of the contraction that produced it: the
    # feature dim, followed through views
    feature: int | None = None
    # lookup tables whose rows these are, unchanged since the lookup
    tables: frozenset = frozenset()
    # the weights of the contraction whose output this is (through bias adds, dropout and views)
    producer: frozenset = frozenset()
    # a residual stream that starts as table rows: those tables (lookups and the tables added to
    # them), kept through residual sums, dropout and views; anything else starts a new stream
    stream: frozenset = frozenset()
    # computed from such rows with no norm in between (so at their scale, not at a norm's rms 1)
    from_rows: bool = False
    # a residual sum, unchanged since: the weights whose outputs were added (if a norm takes it
    # next, a post-norm block: those layers get no signal factor, see plan._post_norm)
    summed: frozenset = frozenset()
    # a norm's output, unchanged since (a post-norm stream: each block's sum starts from one)
    normed: bool = False
    # parameters that multiplied these activations elementwise, unchanged since: param -> (its gain
    # finding, its dims per dim of this tensor). A sum over their dims next makes them contracted
    scaled: dict = field(default_factory=dict, compare=False)
    # computed from these parameters and constants only, no input data (spectral norm's sigma of
    # W): dividing W by it reparametrizes W, it is not a second use
    of_params: frozenset = frozenset()
    # a pointwise function of one earlier activation: (that one's uid, fn, text, nonlinear)
    expr: tuple | None = field(default=None, compare=False)
    # layers in series from the model's inputs: each contraction with a weight adds 1, a merge of
    # activations (a residual sum, a gate, a concat) takes the shortest of them; None for the
    # inputs themselves and what is computed from them with no layer (masks, positions)
    depth: int | None = field(default=None, compare=False)
    uid: int = field(default_factory=lambda: next(_UIDS), compare=False)

    @property
    def rows_scale(self) -> bool:
        return bool(self.stream) or self.from_rows


@dataclass
class Const:
    shape: tuple[int, ...] | None = None


@dataclass
class Finding:
    """One use of one parameter: what role that use implies."""

    param: str
    role: str  # neuron | embedding | gain | bias | additive | free
    axes: tuple[int, ...] | None = None
    split_axis: int | None = None
    groups: int = 1
    op: str = ""
    where: str = ""
    frontend: str = ""
    reason: str = ""
    signal: Any = None  # neuron uses: the activation that produced the op's data input (gains.Signal)
    vector_axis: int | None = None  # table uses: the parameter dim added along the activation's feature dim
    meets: str = ""  # table uses: "logits" when added to attention logits (a logit bias, not feature vectors)
    stream: tuple[str, ...] = ()  # role "stream": the output is added to a stream that starts as these tables' rows
    # made under no_grad (spectral norm's power iteration; but also every op inside a custom
    # autograd.Function's forward or a reentrant checkpoint): counts only where nothing else does
    weak: bool = False


def _map_nested(fn, x):
    """``fn`` over the leaves of nested lists / tuples / dicts (an op's arguments)."""
    if isinstance(x, (list, tuple)):
        return type(x)(_map_nested(fn, y) for y in x)
    if isinstance(x, dict):
        return {k: _map_nested(fn, v) for k, v in x.items()}
    return fn(x)


def _shape(v) -> tuple[int, ...] | None:
    return getattr(v, "shape", None) if isinstance(v, (Derived, Act, Const)) else None


def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat(y)
    else:
        yield x


def _broadcast_origins(d: Derived, out_nd: int) -> dict[str, Origins]:
    """Right-align ``d``'s dims onto an output of ``out_nd`` dims (broadcasting)."""
    res = {}
    for p, org in d.origins.items():
        pad = out_nd - len(org)
        if pad < 0:
            return {}
        res[p] = tuple([frozenset()] * pad) + tuple(org)
    return res


def _merge(a: dict[str, Origins], b: dict[str, Origins]) -> dict[str, Origins]:
    out = dict(a)
    for p, org in b.items():
        if p in out and len(out[p]) == len(org):
            out[p] = tuple(x | y for x, y in zip(out[p], org))
        else:
            out[p] = org
    return out


class Analyzer:
    def __init__(self, frontend: str, param_shapes: dict[str, tuple[int, ...]]):
        self.frontend = frontend
        self.param_shapes = param_shapes
        self.findings: list[Finding] = []
        self.where = ""  # set by the frontend before each call (node or module path)
        # streams (by their tables) that met a sum whose other term no rule scales: none of their
        # branches gets the factor, so the branches keep their mix (never half the blocks scaled)
        self.broken_streams: set[frozenset] = set()
        self.transformed = False  # the recorder followed tensors through a torch.func transform
        self._post_candidates: dict[int, list[Finding]] = {}  # sum uid -> its post-norm findings
        self.chain = 0  # the most layers in series from the inputs to any activation (Act.depth)

    # ---- sources ---------------------------------------------------------------------------
    def source(self, name: str) -> Derived:
        shape = tuple(self.param_shapes[name])
        return Derived(shape, {name: tuple(frozenset([d]) for d in range(len(shape)))}, {name: frozenset()})

    def emit(self, d: Derived, role: str, op: str, reason: str = "", rule: R.Contraction | None = None,
             signal: Any = None, feature: int | None = None, meets: str = "") -> None:
        """One finding per parameter in ``d``. ``signal``: the activation feeding a contraction's
        data input; ``feature``: the feature dim (negative) of the activation a table is added to;
        ``meets``: "logits" when that activation is attention logits."""
        for p, org in d.origins.items():
            g = d.gathered.get(p)
            if g and role in ("gain", "bias", "additive"):
                # rows picked by data and then used as data: an embedding lookup written as indexing
                self.findings.append(Finding(p, "embedding", tuple(sorted(g)), op=op, where=self.where,
                                             frontend=self.frontend, meets=meets,
                                             reason=f"rows selected by an index from inputs, then {reason}"))
                continue
            f = Finding(p, role, op=op, where=self.where, frontend=self.frontend, reason=reason, meets=meets)
            if rule is not None and role in ("neuron", "embedding"):
                f = self._map_contraction(p, org, d.removed.get(p, frozenset()), rule, f, d.shape,
                                          d.contracted.get(p, frozenset()))
                if f.role == "neuron":
                    f.signal = signal
            if role == "additive" and feature is not None and -len(org) <= feature < 0 and len(org[feature]) == 1:
                f.vector_axis = next(iter(org[feature]))
            self.findings.append(f)

    def _track_scaling(self, op: str, args, kwargs, res: Act, before: int) -> None:
        """``x * a`` then ``.sum(dim)`` over a's dims is ``x . a``: a contraction, not a gain."""
        if op == "mul" and res.shape is not None:
            new = [f for f in self.findings[before:] if f.role == "gain"]
            ds = [v for v in _flat((args, kwargs)) if isinstance(v, Derived)]
            if len(ds) == 1 and new and all(f.param in ds[0].origins for f in new):
                orgs = _broadcast_origins(ds[0], len(res.shape))
                res.scaled = {f.param: (f, orgs[f.param]) for f in new if f.param in orgs}
            return
        src = args[0] if args else None
        if op not in R.SUMS or not isinstance(src, Act) or not src.scaled or src.shape is None:
            return
        nd = len(src.shape)
        dim = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim")
        if dim is None:
            return  # a sum of everything is a statistic, not a per-neuron dot product
        dims = {d % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim]) if isinstance(d, int)}
        for p, (f, org) in src.scaled.items():
            if f.role != "gain" or not any(org[d] for d in dims):
                continue
            rule = R.Contraction(neuron=tuple(d for d in range(nd) if d not in dims), fan_in=tuple(sorted(dims)))
            g = Finding(p, "neuron", op=f"{f.op}+{op}", where=f.where, frontend=f.frontend,
                        reason=f"multiplies activations elementwise, then {op} over its dims: a dot product")
            g = self._map_contraction(p, org, frozenset(), rule, g)  # kept dims it does not span are data dims
            if g.role == "neuron":
                f.role, f.axes, f.op, f.reason = g.role, g.axes, g.op, g.reason

    def note_depth(self, a: Act) -> None:
        if a.depth is not None and a.depth > self.chain:
            self.chain = a.depth

    def post_norm(self, x: Act) -> None:
        """A norm that takes ``x + f(x)`` with ``x`` a norm's output: the layers whose outputs were
        added end a post-norm branch (BERT's ``norm(x + f(x))``). Withdrawn if the sum is also
        carried on to a later sum (then it is a pre-norm stream that a block's norm reads)."""
        for p in sorted(x.summed):
            f = Finding(p, "postnorm", op="add", where=self.where, frontend=self.frontend,
                        reason="output added to a norm's output in a residual sum that a norm takes next")
            self.findings.append(f)
            self._post_candidates.setdefault(x.uid, []).append(f)

    def _continued(self, acts: list[Act]) -> None:
        for a in acts:
            for f in self._post_candidates.pop(a.uid, []):
                f.role = "stream-sum"  # not a post-norm block: the sum goes on; ignored by the plan

    def mark_logit_tables(self, acts: list[Act]) -> None:
        """Looked-up rows added to attention logits: those tables are logit biases."""
        for a in acts:
            for p in sorted(a.tables):
                self.findings.append(Finding(p, "embedding", (0,), op="add", where=self.where, frontend=self.frontend,
                                             reason="looked-up rows added to attention logits", meets="logits"))

    def _map_contraction(self, p, org, removed, rule: R.Contraction, f: Finding, used_shape=None,
                         contracted: frozenset = frozenset()) -> Finding:
        shape = self.param_shapes[p]
        if any(d >= len(org) for d in rule.neuron + rule.fan_in):
            f.role, f.reason = "free", f"{rule.role} rule of {f.op} does not fit the tensor's dims"
            return f
        neuron = set().union(*[org[d] for d in rule.neuron]) | set(removed)
        fan_in = set().union(*[org[d] for d in rule.fan_in])
        summed = set(contracted) - neuron - fan_in
        if summed:
            # a factor of a product of parameters: its summed dim is on the side it does not
            # occupy (W = B @ A used as a weight: B's rows are neurons and its r is their fan-in;
            # A's columns are fan-in and its r indexes neurons, as x @ A.T @ B.T computes)
            if neuron and not fan_in:
                fan_in |= summed
            elif fan_in and not neuron:
                neuron |= summed
            else:
                f.role, f.reason = "free", f"a factor of a product of parameters that spans both sides of {f.op}"
                return f
        n_used = math.prod(used_shape[d] for d in rule.neuron) if used_shape and rule.role == "neuron" else 1
        if n_used > 1 and math.prod(shape[d] for d in neuron) == 1 and fan_in:
            # one value per input, broadcast over all the op's neurons (a per-column scale such as
            # weight norm's g with dim=1): it scales, it is not a neuron
            f.role = "gain"
            f.reason = f"shared by all {n_used} neurons of {f.op} (broadcast): scales their inputs"
            return f
        split = None
        if rule.split_axis is not None:
            src = org[rule.split_axis]
            if len(src) != 1:
                f.role, f.reason = "free", f"grouped fan-in of {f.op} spans several parameter dims"
                return f
            split = next(iter(src))
        both = neuron & fan_in
        if both:
            f.role = "free"
            f.reason = f"dims {sorted(both)} feed both neurons and fan-in of {f.op} (through a reshape)"
            return f
        missing = [d for d in range(len(shape)) if d not in neuron | fan_in and shape[d] != 1]
        if missing:
            # a parameter dim that reaches neither side (reduced away, or broadcast): cannot place
            f.role, f.reason = "free", f"dims {missing} do not reach {f.op}"
            return f
        f.axes = tuple(sorted(neuron))
        f.split_axis, f.groups = split, rule.groups
        return f

    # ---- calls -----------------------------------------------------------------------------
    def call(self, op: str, args: tuple, kwargs: dict, out_shape: Any = None, fn: Callable | None = None) -> Any:
        """Interpret one call. ``out_shape``: the output's shape (a tuple of tuples for several
        outputs) when the frontend knows it. Returns the value(s) describing the output."""
        before = len(self.findings)
        res = self._call(op, args, kwargs, out_shape, fn)
        if isinstance(res, Act):
            self._track_scaling(op, args, kwargs, res, before)
        flat = list(_flat((args, kwargs)))
        acts = [v for v in flat if isinstance(v, Act)]
        for r in res if isinstance(res, list) else [res]:
            if isinstance(r, Act):
                if r.depth is None:
                    r.depth = merged_depth(acts)
                self.note_depth(r)
        ds = [v for v in flat if isinstance(v, Derived)]
        if (ds or acts) and all(a.of_params for a in acts):  # no input data among the inputs
            params = frozenset().union(*[a.of_params for a in acts], *[frozenset(d.origins) for d in ds])
            for r in res if isinstance(res, list) else [res]:
                if isinstance(r, Act):
                    r.of_params = params
        gathered: dict[str, frozenset] = {}
        for v in _flat((args, kwargs)):
            if isinstance(v, Derived):
                for p, g in v.gathered.items():
                    gathered[p] = gathered.get(p, frozenset()) | g
        if gathered:  # data-selected rows stay data-selected through views and elementwise maths
            for r in res if isinstance(res, list) else [res]:
                if isinstance(r, Derived):
                    for p in r.origins:
                        if p in gathered:
                            r.gathered[p] = r.gathered.get(p, frozenset()) | gathered[p]
        return res

    def _call(self, op: str, args: tuple, kwargs: dict, out_shape: Any = None, fn: Callable | None = None) -> Any:
        if op in R.SHAPE_ONLY:  # metadata or a fresh tensor "like" the argument: no values flow
            return self._plain(out_shape, False)
        flat = list(_flat((args, kwargs)))
        derived = [v for v in flat if isinstance(v, Derived)]
        has_act = any(isinstance(v, Act) for v in flat)
        if not derived:
            return self._act_flow(op, args, kwargs, out_shape, [v for v in flat if isinstance(v, Act)])
        if out_shape is None and fn is not None:
            out_shape = _meta_shape(fn, args, kwargs)

        bound = R.bind(op, args, kwargs)
        if not has_act and (op in R.PARAM_PRODUCTS or op in R.DATA_SLOT or op == "einsum"):
            picked = [v for v in derived if v.gathered]
            if picked and len(picked) < len(derived):
                # rows picked by data indices meet a parameter: they are the data, the parameter the
                # weight ((E[idx] + P) @ W, F.linear(E[idx], W))
                acts = {id(v): self._as_data(v, op) for v in picked}
                swap = lambda v: acts.get(id(v), v) if isinstance(v, Derived) else v  # noqa: E731
                return self._call(op, tuple(_map_nested(swap, a) for a in args),
                                  {k: _map_nested(swap, v) for k, v in kwargs.items()}, out_shape, fn)
            if op in R.PARAM_PRODUCTS and not picked and len(derived) == 2:
                return self._param_product(bound, out_shape)
        # contractions, norms and other ops with per-argument rules
        ruled = False
        passthrough = None
        operands = list(args[1:]) if op == "einsum" else None
        if op == "einsum" and len(args) == 2 and isinstance(args[1], (list, tuple)):
            operands = list(args[1])
        data = [v for v in bound.values() if isinstance(v, Act)]
        data_signal = input_signal(data[0]) if len(data) == 1 else None
        out_feature = None  # the feature dim of a contraction's output
        producer: set[str] = set()  # the weights whose contraction this is
        inputs = [v for v in flat if isinstance(v, Act)]
        for name, val in list(bound.items()) if op != "einsum" else []:
            if isinstance(val, Derived):
                rule = R.contraction(op, name, val.shape or (), bound)
                if rule is None:
                    continue
                ruled = True
                if rule == "passthrough":
                    passthrough = val
                elif isinstance(rule, R.Contraction):
                    self._contract(val, rule, op, name, data_signal)
                    out_feature = R.output_feature(op, name, len(val.shape or ()))
                    if rule.role == "neuron" and name != R.DATA_SLOT.get(op):
                        producer |= set(val.origins)
                else:
                    meets = "logits" if op == "sdpa" and name == "attn_mask" else ""
                    self.emit(val, rule, op, f"{name} of {op}", meets=meets)
        if op == "einsum" and operands:
            ruled = True
            data = {i for i, v in enumerate(operands) if isinstance(v, Act)}
            for i, val in enumerate(operands):
                if isinstance(val, Derived):
                    rule = R.einsum_operand(bound["equation"], i, len(val.shape or ()), data)
                    if rule is None:
                        self.emit(val, "free", op, f"einsum operand {i} does not match '{bound['equation']}'")
                    elif rule.role == "gain":
                        self.emit(val, "gain", op, f"einsum operand {i}: nothing contracted, it scales")
                    else:
                        self._contract(val, rule, op, f"operand {i}")
                        if rule.role == "neuron":
                            producer |= set(val.origins)
        if ruled:
            if passthrough is not None:
                return self._elementwise([passthrough], out_shape or passthrough.shape)
            if op in R.NORMS and isinstance(bound.get("input"), Act):
                self.post_norm(bound["input"])
                return Act(out_shape, feature=bound["input"].feature, normed=True)  # a norm keeps the feature dim
            if op in R.EMBEDDINGS:
                tables = frozenset(p for v in bound.values() if isinstance(v, Derived) for p in v.origins)
                return Act(out_shape, feature=-1, tables=tables, stream=tables, depth=layer_depth(inputs))
            if op == "sdpa":
                self.mark_logit_tables([v for k, v in bound.items() if k == "attn_mask" and isinstance(v, Act)])
            if isinstance(out_shape, list):
                return self._plain(out_shape, True)
            return Act(out_shape, feature=out_feature, producer=frozenset(producer),
                       from_rows=any(a.rows_scale for a in inputs), depth=layer_depth(inputs) if producer else None)

        # views
        if op in R.PERMUTES | R.RESHAPES | R.EXPANDS | R.SELECTS | R.SPLITS | R.IDENTITY:
            if not (args and isinstance(args[0], Derived)) and op not in R.SELECTS:
                # x.to(W), x.view_as(W), x.expand_as(W): W lends only its dtype/shape, no values
                return self._plain(out_shape, has_act)
            src = args[0] if args and isinstance(args[0], Derived) else derived[0]
            if op in R.SELECTS and _index_is_act(args, kwargs):
                # rows picked by data: an embedding lookup, or routed (per-example / per-expert)
                # weights. Which one is decided by what consumes the result (see emit).
                new = _map_view(op, src, src.shape, out_shape if isinstance(out_shape, tuple) else None, args, kwargs)
                if not isinstance(new, Derived):
                    self.emit(src, "embedding", op, "rows selected by an index computed from inputs",
                              R.Contraction(neuron=(0,), fan_in=tuple(range(1, len(src.shape or (1,)))),
                                            role="embedding"))
                    return self._plain(out_shape, True)
                for p, org in src.origins.items():
                    g = new.removed.get(p, frozenset()) - src.removed.get(p, frozenset())
                    if not g and op in ("index_select", "gather", "take_along_dim"):
                        d = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("dim", 0)
                        g = org[d % len(org)] if isinstance(d, int) and org else frozenset()
                    new.gathered[p] = g or frozenset([0])
                return new
            return self._view(op, src, args, kwargs, out_shape)
        if op in R.REDUCTIONS:
            return self._reduce(derived[0], args, kwargs, out_shape)

        # elementwise maths
        if op in R.ELEMENTWISE_UNARY | R.ELEMENTWISE_BINARY | R.CONCATS:
            if has_act:
                acts = [v for v in flat if isinstance(v, Act)]
                own = frozenset().union(*[a.of_params for a in acts])
                if op in R.MULTIPLICATIVE and len(derived) == 1 and all(a.of_params for a in acts) \
                        and set(derived[0].origins) <= own and isinstance(args[0], Derived):
                    # W / sigma(W) with sigma computed from W and constants (spectral norm): W still
                    return self._elementwise([derived[0]], out_shape or derived[0].shape)
                logits = any(a.signal == G.SIMILARITY for a in acts)
                feature = _common_feature(acts)
                for i, val in enumerate(args):
                    for v in _flat(val):
                        if isinstance(v, Derived):
                            role_op = op
                            if op in ("addcmul", "addcdiv") and i > 0:
                                role_op = "addcmul_factor"
                            self.emit(v, R.affine_role(role_op, v.shape or ()), op, f"{op} with activations",
                                      feature=None if logits else feature, meets="logits" if logits else "")
                if op in R.ADDITIVE_OPS | R.CONCATS and not isinstance(out_shape, list):
                    # adding a bias/table keeps what the activation is (logits stay logits, features features)
                    if op in R.ADDITIVE_OPS and len(acts) == 1 and not logits:
                        # a bias keeps the layer's output its output; a table added to table rows joins
                        # the stream they start
                        a = acts[0]
                        stream = a.stream | {p for d in derived for p in d.origins} if a.stream else frozenset()
                        return Act(out_shape, feature=feature, producer=a.producer, stream=frozenset(stream),
                                   from_rows=a.from_rows)
                    return Act(out_shape, G.SIMILARITY if logits else None, None if logits else feature,
                               from_rows=any(a.rows_scale for a in acts))
                return self._plain(out_shape, True)
            if op in R.CONCATS:
                return self._concat(op, derived, args, kwargs, out_shape)
            return self._elementwise_params(op, derived, out_shape)

        # values written into a tensor: into activations they are learned inputs (a class token set
        # by x[:, 0] = tok), into a constant buffer they become its values
        if op in R.WRITES:
            shape = out_shape if isinstance(out_shape, tuple) else _shape(args[0]) if args else None
            if has_act:
                for v in derived:
                    self.emit(v, "additive", op, f"written into activations by {op}")
                return Act(shape)
            return self._elementwise(derived, shape)

        # no rule: say so, never guess
        for v in derived:
            self.emit(v, "free", op, f"consumed by '{op}', which has no rule")
        return self._plain(out_shape, has_act)

    # ---- helpers ---------------------------------------------------------------------------
    def _as_data(self, d: Derived, op: str) -> Act:
        """Data-picked rows used as data: each picked table is an embedding (its rows along the
        picked dims), each parameter combined with them gets its pending role; the result is the
        activation those rows make (a stream of table rows, like an embedding lookup's)."""
        for p, org in d.origins.items():
            one = Derived(d.shape, {p: org}, {p: d.removed.get(p, frozenset())})
            if p in d.gathered:
                one.gathered[p] = d.gathered[p]
                self.emit(one, "additive", op, f"used as the data input of {op}")
            else:
                self.emit(one, d.pending.get(p, "additive"), op, f"combined with rows selected by an index from "
                          f"inputs, the data input of {op}", feature=-1)
        return Act(d.shape, feature=-1, tables=frozenset(d.gathered), stream=frozenset(d.origins))

    def _param_product(self, bound: dict, out_shape) -> Derived:
        """``A @ B`` of two parameter-derived tensors (no activation): a weight made of both. Each
        output dim keeps the factor dims feeding it; the summed dim is recorded as contracted."""
        vals = [v for v in bound.values() if isinstance(v, (Derived, Const))]
        a, b = (vals + [None, None])[:2]
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None or not sa or not sb:
            return self._elementwise([v for v in (a, b) if isinstance(v, Derived)], out_shape)
        na, nb = len(sa), len(sb)
        nout = len(out_shape) if isinstance(out_shape, tuple) else max(na, nb) - (na == 1) - (nb == 1)
        origins, removed, contracted = {}, {}, {}

        def place(v, side):
            n = len(v.shape)
            k = (n - 1) if side == "a" else (0 if n == 1 else n - 2)  # the summed dim
            keep = {}  # operand dim -> output dim
            if n >= 2:
                if side == "a":
                    keep[n - 2] = nout - (2 if nb >= 2 else 1)
                else:
                    keep[n - 1] = nout - 1
                for i in range(n - 2):  # batch dims, right-aligned
                    keep[i] = nout - (n - i) + (0 if (side == "b" or nb >= 2) else 1)
            for p, org in v.origins.items():
                out = [frozenset()] * nout
                for i, o in keep.items():
                    if 0 <= o < nout:
                        out[o] = out[o] | org[i]
                origins[p] = tuple(x | y for x, y in zip(origins[p], out)) if p in origins else tuple(out)
                contracted[p] = contracted.get(p, frozenset()) | org[k] | v.contracted.get(p, frozenset())
                removed[p] = removed.get(p, frozenset()) | v.removed.get(p, frozenset())

        for v, side in ((a, "a"), (b, "b")):
            if isinstance(v, Derived):
                place(v, side)
        return Derived(tuple(out_shape) if isinstance(out_shape, tuple) else None, origins, removed,
                       contracted=contracted)

    def _plain(self, out_shape, act: bool):
        if isinstance(out_shape, list):
            return [Act(s) if act else Const(s) for s in out_shape]
        return Act(out_shape) if act else Const(out_shape)

    def _contract(self, val: Derived, rule: R.Contraction, op: str, argname: str, signal: Any = None):
        if argname == R.DATA_SLOT.get(op):
            # a parameter fed where data goes: a learned input (queries, latents), not weights
            self.emit(val, "additive", op, f"fed to {op} as its input (a learned input, not a weight)")
            return
        self.emit(val, rule.role, op, f"{argname} of {op}", rule, signal=signal)

    # ---- activations: what kind of signal flows (for gains and tables) ------------------------
    def _act_flow(self, op: str, args: tuple, kwargs: dict, out_shape, acts: list[Act]):
        """The output of an op on activations and constants only, with its signal tags and, for
        elementwise maths on one activation, the pointwise function it computes of it."""
        out = self._act_tags(op, args, kwargs, out_shape, acts)
        if isinstance(out, Act) and out.expr is None:
            out.expr = _pointwise(op, args, kwargs)
        return out

    def _act_tags(self, op: str, args: tuple, kwargs: dict, out_shape, acts: list[Act]):
        if not acts:
            return self._plain(out_shape, False)
        first = args[0] if args and isinstance(args[0], Act) else None
        if op == "sdpa":  # its attn_mask is added to the logits inside
            self.mark_logit_tables([v for k, v in R.bind(op, args, kwargs).items()
                                    if k == "attn_mask" and isinstance(v, Act)])
            return Act(out_shape)
        if isinstance(out_shape, list) or first is None:
            if op in R.PAIR_PRODUCTS and len(acts) >= 2 and not isinstance(out_shape, list):
                return self._pair_product(acts, out_shape)
            if isinstance(out_shape, list) and first is not None and op in R.SPLITS:
                return [self._view_act(op, first, args, kwargs, s) for s in out_shape]
            if op in R.ELEMENTWISE_UNARY | R.ELEMENTWISE_BINARY and not isinstance(out_shape, list):
                return _elementwise_act(acts, out_shape)  # where(mask, rows, fill): rows not first
            if op in R.CONCATS and not isinstance(out_shape, list):  # cat([rows, shifted rows]): still their scale
                return Act(out_shape, from_rows=any(a.rows_scale for a in acts))
            return self._plain(out_shape, True)
        sig = G.activation_signal(op, args, kwargs)
        if sig is not None:
            return Act(out_shape, sig, first.feature, from_rows=first.rows_scale)
        if op in G.PRESERVING:
            return replace(first, shape=out_shape if out_shape is not None else first.shape)
        if op in R.PERMUTES | R.RESHAPES | R.EXPANDS | R.SPLITS or (op in R.SELECTS and not _index_is_act(args, kwargs)):
            return self._view_act(op, first, args, kwargs, out_shape)
        if op in R.PAIR_PRODUCTS and len(acts) >= 2:
            return self._pair_product(acts, out_shape)
        if op in ("softmax", "log_softmax", "softmin"):
            return Act(out_shape, G.PROBS)
        if op in R.NORMS:
            self.post_norm(first)
            return Act(out_shape, feature=first.feature, normed=True)
        if len(acts) == 1 and first.signal == G.SIMILARITY and op in R.LOGIT_PRESERVING:
            return Act(out_shape, G.SIMILARITY)  # scaled or masked logits are still logits
        if op in R.ADDITIVE_OPS and len(acts) == 2:
            logits = [a for a in acts if a.signal == G.SIMILARITY]
            if logits:
                self.mark_logit_tables([a for a in acts if a.signal != G.SIMILARITY])
                return Act(out_shape, G.SIMILARITY)
            if op == "add" and len(args) >= 2 and all(isinstance(v, Act) for v in args[:2]):
                self._continued(acts)
                out = self._residual_sum(acts, out_shape)
                if any(a.normed for a in acts):  # norm output + branch: a post-norm block if a norm takes it
                    out = replace(out, summed=frozenset().union(*[a.producer for a in acts if not a.normed]),
                                  uid=next(_UIDS))
                return out
        if op in R.ELEMENTWISE_UNARY | R.ELEMENTWISE_BINARY | R.CONCATS:
            return _elementwise_act(acts, out_shape)
        return Act(out_shape)

    def _residual_sum(self, acts: list[Act], out_shape) -> Act:
        """``stream + branch``: a layer's output added to a residual stream that starts as table rows.
        The layer is recorded (a "stream" finding: the plan scales its gain to those rows' rms, so
        each branch enters at the stream's starting scale); the sum is that stream still."""
        out = _elementwise_act(acts, out_shape)
        streams = [a for a in acts if a.stream]
        if len(streams) == 2:  # token rows + position rows: one stream of both
            return replace(out, stream=streams[0].stream | streams[1].stream, from_rows=False)
        if len(streams) != 1 or len(acts) != 2:
            return out
        key = streams[0].stream
        other = acts[1] if acts[0] is streams[0] else acts[0]
        if other.producer and not other.rows_scale and key not in self.broken_streams:
            tables = tuple(sorted(key))
            for p in sorted(other.producer):
                self.findings.append(Finding(p, "stream", op="add", where=self.where, frontend=self.frontend,
                                             reason="output added to a residual stream of table rows", stream=tables))
            return replace(out, stream=key, from_rows=False)
        # a term no rule scales (a routed mixture of experts, an opaque module, something computed
        # from the rows without a norm, so at a scale of its own): the stream's branches keep their
        # gains, all of them
        self.broken_streams.add(key)
        for f in self.findings:
            if f.role == "stream" and frozenset(f.stream) == key:
                f.stream = ()
        return out

    @staticmethod
    def _pair_product(acts: list[Act], out_shape) -> Act:
        """q @ k^T of two activations is a similarity (attention logits); probabilities @ v are
        features again (at the scale of v)."""
        if any(a.signal == G.PROBS for a in acts):
            return Act(out_shape, from_rows=any(a.rows_scale for a in acts if a.signal != G.PROBS))
        return Act(out_shape, G.SIMILARITY)

    def _view_act(self, op, src: Act, args, kwargs, out_shape) -> Act:
        """A view of an activation: its signal and tables stay; its feature dim moves with the view."""
        feature = None
        if src.feature is not None and src.shape is not None and -len(src.shape) <= src.feature < 0:
            nd = len(src.shape)
            k = nd + src.feature
            probe = Derived(tuple(src.shape), {"#": tuple(frozenset([0]) if i == k else frozenset() for i in range(nd))})
            new = _map_view(op, probe, probe.shape, out_shape if isinstance(out_shape, tuple) else None, args, kwargs)
            if isinstance(new, Derived) and "#" in new.origins:
                hits = [j for j, o in enumerate(new.origins["#"]) if o == frozenset([0])]
                if len(hits) == 1:
                    feature = hits[0] - len(new.origins["#"])
        return _keep_expr(Act(out_shape, src.signal, feature, src.tables, src.producer, src.stream, src.from_rows), src)

    def _elementwise(self, ds: list[Derived], out_shape) -> Derived | Act:
        nd = len(out_shape) if out_shape is not None else max(len(d.shape or ()) for d in ds)
        origins, removed, contracted, pending = {}, {}, {}, {}
        for d in ds:
            origins = _merge(origins, _broadcast_origins(d, nd))
            for p, r in d.removed.items():
                removed[p] = removed.get(p, frozenset()) | r
            for p, c in d.contracted.items():
                contracted[p] = contracted.get(p, frozenset()) | c
            pending.update(d.pending)
        return Derived(tuple(out_shape) if out_shape is not None else None, origins, removed,
                       contracted=contracted, pending=pending)

    def _elementwise_params(self, op: str, ds: list[Derived], out_shape):
        """Parameters combined with each other or constants (no activation): the result still
        carries them. A multiplier that broadcasts against another parameter is a gain."""
        if op in R.MULTIPLICATIVE and len(ds) == 2 and ds[0].shape and ds[1].shape:
            a, b = ds
            small = _broadcast_smaller(a.shape, b.shape)
            if small is not None:
                g, w = (a, b) if small == 0 else (b, a)
                if not set(g.origins) <= set(w.origins):
                    self.emit(g, "gain", op, "multiplies another parameter by broadcasting")
                # else a parameter scaled by a statistic of itself (W / sigma(W), W / ||W||): a
                # reparametrization of W, not a second use
                return self._elementwise([w], out_shape)
        out = self._elementwise(ds, out_shape)
        picked = [d for d in ds if d.gathered]
        if picked and len(picked) < len(ds):
            # data-picked rows combined with other parameters (E[idx] + P): if the sum is then used
            # as data, the others were added to (or scaled) data
            for d in ds:
                if not d.gathered:
                    for p in d.origins:
                        out.pending.setdefault(p, R.affine_role(op, d.shape or ()))
        return out

    def _concat(self, op, ds, args, kwargs, out_shape):
        seq = args[0] if args else kwargs.get("tensors", ())
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if op == "stack" and isinstance(dim, int):
            return self._stack(ds, dim, out_shape)
        if op != "cat":
            for d in ds:
                self.emit(d, "free", op, f"stacked by {op} without activations (no rule)")
            return self._plain(out_shape, False)
        nd = len(out_shape) if out_shape is not None else max(len(d.shape or ()) for d in ds)
        parts = [v for v in seq if isinstance(v, Derived)]
        return self._elementwise(parts, out_shape) if isinstance(dim, int) and nd else self._plain(out_shape, False)

    def _stack(self, ds: list[Derived], dim: int, out_shape):
        """torch.stack of weights (per-expert or per-layer tensors): each part's dims move past a
        new leading-or-inner dim that no parameter dim feeds."""
        nd = len(ds[0].shape or ()) + 1
        if any(d.shape is None or len(d.shape) != nd - 1 for d in ds):
            for d in ds:
                self.emit(d, "free", "stack", "stacked by stack with unknown shapes")
            return self._plain(out_shape, False)
        k = dim % nd
        shape = tuple(ds[0].shape[:k]) + (len(ds),) + tuple(ds[0].shape[k:])
        moved = [Derived(shape, {p: tuple(org[:k]) + (frozenset(),) + tuple(org[k:]) for p, org in d.origins.items()},
                         d.removed) for d in ds]
        return self._elementwise(moved, out_shape if isinstance(out_shape, tuple) else shape)

    def _reduce(self, d: Derived, args, kwargs, out_shape):
        if d.shape is None:
            return Const(out_shape)
        nd = len(d.shape)
        dim = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim")
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        if dim is None:
            dims = set(range(nd))
        else:
            dims = {x % nd for x in (dim if isinstance(dim, (list, tuple)) else [dim]) if isinstance(x, int)}
        origins = {}
        for p, org in d.origins.items():
            origins[p] = tuple(frozenset() if i in dims else o for i, o in enumerate(org) if keep or i not in dims)
        return Derived(tuple(out_shape) if isinstance(out_shape, tuple) else None, origins, dict(d.removed))

    def _view(self, op, src: Derived, args, kwargs, out_shape):
        ins = src.shape
        if isinstance(out_shape, list):  # splits: several outputs
            outs = []
            for s in out_shape:
                outs.append(self._view_one(op, src, ins, s, args, kwargs))
            return outs
        return self._view_one(op, src, ins, out_shape, args, kwargs)

    def _view_one(self, op, src: Derived, ins, outs, args, kwargs):
        new = _map_view(op, src, ins, outs, args, kwargs)
        if new is None:
            self.emit(src, "free", op, f"could not follow dims through '{op}' (shapes unknown)")
            return Const(outs)
        return new


def merged_depth(acts: list[Act]) -> int | None:
    """Act.depth of what an op computes from ``acts`` with no weight: the shortest of them (a
    residual sum has the identity path's depth; a path around a deep branch is a shortcut)."""
    known = [a.depth for a in acts if a.depth is not None]
    return min(known) if known else None


def layer_depth(acts: list[Act]) -> int:
    """Act.depth of a layer's output: one more than its inputs'."""
    return (merged_depth(acts) or 0) + 1


def _elementwise_act(acts: list[Act], out_shape) -> Act:
    """Elementwise maths on activations: the feature dim they agree on; looked-up rows masked,
    scaled or shifted are still those rows (they matter only if they reach attention logits), and
    computed from them (no longer the stream itself: a scaled stream is not at the rows' scale)."""
    return Act(out_shape, feature=_common_feature(acts), tables=frozenset().union(*(a.tables for a in acts)),
               from_rows=any(a.rows_scale for a in acts))


def _term(v):
    """(base uid, fn, text, nonlinear) of an operand of pointwise maths; a number is a constant."""
    if isinstance(v, Act):
        return v.expr if v.expr is not None else (v.uid, lambda z: z, "z", False)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (None, lambda z, c=float(v): c, f"{v:g}", False)
    return None


def _pointwise(op: str, args: tuple, kwargs: dict) -> tuple | None:
    """The pointwise function ``op`` computes of one activation (the base every Act operand shares),
    or None: other ops, tensors other than that activation, keyword options beyond an activation's."""
    if op in G.ACTIVATIONS:
        sig = G.activation_signal(op, args, kwargs)
        t = _term(args[0]) if sig is not None and args else None
        if t is None or t[0] is None:
            return None
        act, kw = G.ACTIVATIONS[op][0], dict(sig[1])
        return (t[0], lambda z, f=t[1]: act(f(z), **kw), f"{G.describe(sig)}({t[2]})" if t[2] != "z" else G.describe(sig), True)
    if kwargs:
        return None
    if op in G.UNARY_FNS and len(args) == 1:
        fns, arity = G.UNARY_FNS[op], 1
    elif op in G.BINARY_FNS and len(args) == 2:
        fns, arity = G.BINARY_FNS[op], 2
    else:
        return None
    terms = [_term(a) for a in args[:arity]]
    if any(t is None for t in terms):
        return None
    bases = {t[0] for t in terms if t[0] is not None}
    if len(bases) != 1:
        return None
    number = [t[0] is None for t in terms]
    if op in G.LINEAR_OPS or (op == "mul" and any(number)) or (op == "div" and number[-1]):
        own = False  # an affine map: z + c, c z, z / c
    elif op == "pow" and number[1] and terms[1][2] == "1":
        own = False
    else:
        own = True
    nonlinear = own or any(t[3] for t in terms)
    text = f"{op}({', '.join(t[2] for t in terms)})"
    if len(text) > 160:
        text = text[:157] + "..."
    if arity == 1:
        return (bases.pop(), lambda z, f=terms[0][1], g=fns: g(f(z)), text, nonlinear)
    return (bases.pop(), lambda z, a=terms[0][1], b=terms[1][1], g=fns: g(_as_t(a(z), z), _as_t(b(z), z)), text, nonlinear)


def _as_t(v, z):
    return v if isinstance(v, torch.Tensor) else torch.full_like(z, v)


def _keep_expr(new: Act, src: Act) -> Act:
    """A view of a pointwise composite is still that function of a z, but of a z moved like the
    view: its own base, so it never combines elementwise with terms of the unmoved one."""
    if src.expr is not None:
        new.expr = (new.uid, *src.expr[1:])
    return new


def input_signal(a: Act):
    """What feeds a contraction: an activation's tag, or the pointwise composite it is of one
    pre-activation (nonlinear ones only: an affine map of the pre-activation itself keeps gain 1)."""
    if a.expr is not None and a.expr[3] and a.expr[2] != (G.describe(a.signal) if isinstance(a.signal, tuple) else None):
        sig = G.pointwise_signal(a.expr[1], a.expr[2])
        if sig is not None:
            return sig
    return a.signal


def _common_feature(acts: list[Act]) -> int | None:
    """The feature dim the activations agree on (those that have one), else None."""
    fs = {a.feature for a in acts if a.feature is not None}
    return fs.pop() if len(fs) == 1 else None


def _broadcast_smaller(a, b) -> int | None:
    """0 if ``a`` broadcasts up to ``b`` (a size-1 or missing dim where b has more), 1 for the
    reverse, None if neither or both."""
    nd = max(len(a), len(b))
    a2, b2 = (1,) * (nd - len(a)) + tuple(a), (1,) * (nd - len(b)) + tuple(b)
    a_small = any(x == 1 and y > 1 for x, y in zip(a2, b2))
    b_small = any(y == 1 and x > 1 for x, y in zip(a2, b2))
    if a_small and not b_small:
        return 0
    if b_small and not a_small:
        return 1
    return None


def _index_is_act(args, kwargs) -> bool:
    return any(isinstance(v, Act) for v in _flat((args[1:], kwargs)))


def _ints(x):
    if isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(x[0], (list, tuple)):
        x = x[0]
    return [v for v in x] if isinstance(x, (list, tuple)) else [x]


def _map_view(op, src: Derived, ins, outs, args, kwargs) -> Derived | None:
    """Map each output dim of a view op to the parameter dims feeding it."""
    if ins is None:
        return None
    nd = len(ins)
    rem = dict(src.removed)

    def perm(order):
        return Derived(tuple(outs) if outs else tuple(ins[i] for i in order),
                       {p: tuple(org[i] for i in order) for p, org in src.origins.items()}, rem)

    if op in R.IDENTITY:
        return Derived(ins, dict(src.origins), rem)
    if op in ("T", "numpy_T", "adjoint") or (op == "t" and nd == 2):
        return perm(list(reversed(range(nd))) if op in ("T", "numpy_T") else list(range(nd - 2)) + [nd - 1, nd - 2])
    if op == "t":
        return Derived(ins, dict(src.origins), rem)
    if op in ("mT", "mH", "H"):
        return perm(list(range(nd - 2)) + [nd - 1, nd - 2])
    if op == "transpose":
        a = args[1] if len(args) > 1 else kwargs.get("dim0")
        b = args[2] if len(args) > 2 else kwargs.get("dim1")
        if not isinstance(a, int) or not isinstance(b, int):
            return None
        order = list(range(nd))
        order[a % nd], order[b % nd] = order[b % nd], order[a % nd]
        return perm(order)
    if op == "permute":
        order = _ints(args[1:] if len(args) > 1 else kwargs.get("dims"))
        if not all(isinstance(o, int) for o in order) or len(order) != nd:
            return None
        return perm([o % nd for o in order])
    if op == "movedim":
        if outs is None:
            return None
        s = _ints(args[1] if len(args) > 1 else kwargs.get("source"))
        d = _ints(args[2] if len(args) > 2 else kwargs.get("destination"))
        if not all(isinstance(o, int) for o in s + d):
            return None
        order = [None] * nd
        for a, b in zip(s, d):
            order[b % nd] = a % nd
        rest = iter(i for i in range(nd) if i not in {a % nd for a in s})
        order = [o if o is not None else next(rest) for o in order]
        return perm(order)
    if outs is None and op == "flatten":
        # flatten(start, end) merges a known range of dims: no sizes needed
        a = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        b = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if isinstance(a, int) and isinstance(b, int) and nd:
            a, b = a % nd, b % nd
            origins = {p: org[:a] + (frozenset().union(*org[a:b + 1]),) + org[b + 1:] for p, org in src.origins.items()}
            return Derived(None, origins, rem)
    if outs is None and op in ("expand", "repeat", "tile", "unsqueeze"):
        # the number of output dims is known from the arguments even when the sizes are not
        n_out = nd + 1 if op == "unsqueeze" else max(nd, len(_ints(args[1:] if len(args) > 1 else kwargs.get("size", ()))))
        outs = (None,) * n_out
    if outs is None:
        return None
    outs = tuple(outs)
    if op in R.RESHAPES:
        groups = R.reshape_groups(tuple(ins), outs)
        if groups is None:
            return None
        origins = {}
        for p, org in src.origins.items():
            new = [frozenset()] * len(outs)
            for gs, gd in groups:
                u = frozenset().union(*[org[i] for i in gs])
                for j in gd:
                    new[j] = u
            origins[p] = tuple(new)
        return Derived(outs, origins, rem)
    if op in R.EXPANDS:
        if op == "squeeze":
            keep = [i for i in range(nd) if ins[i] != 1]
            if len(keep) != len(outs):
                keep = _squeeze_keep(ins, outs)
                if keep is None:
                    return None
            return Derived(outs, {p: tuple(org[i] for i in keep) for p, org in src.origins.items()}, rem)
        if op == "unsqueeze":
            d = args[1] if len(args) > 1 else kwargs.get("dim")
            if not isinstance(d, int):
                return None
            d = d % (nd + 1)
            return Derived(outs, {p: org[:d] + (frozenset(),) + org[d:] for p, org in src.origins.items()}, rem)
        # expand / repeat / tile / broadcast: right-aligned, new leading dims carry nothing
        return Derived(outs, _broadcast_origins(src, len(outs)), rem)
    if op in R.SPLITS:
        if op == "unbind":
            d = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if not isinstance(d, int):
                return None
            d %= nd
            return Derived(outs, {p: org[:d] + org[d + 1:] for p, org in src.origins.items()},
                           {p: rem.get(p, frozenset()) | org[d] for p, org in src.origins.items()})
        return Derived(outs, dict(src.origins), rem)  # chunk / split keep every dim
    if op in R.SELECTS:
        return _map_select(op, src, ins, outs, args, kwargs)
    return None


def _squeeze_keep(ins, outs):
    keep, j = [], 0
    for i, s in enumerate(ins):
        if j < len(outs) and s == outs[j]:
            keep.append(i)
            j += 1
        elif s != 1:
            return None
    return keep if j == len(outs) else None


def _map_select(op, src: Derived, ins, outs, args, kwargs):
    nd = len(ins)
    rem = dict(src.removed)
    if op in ("select",):
        d = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(d, int):
            return None
        d %= nd
        return Derived(outs, {p: org[:d] + org[d + 1:] for p, org in src.origins.items()},
                       {p: rem.get(p, frozenset()) | org[d] for p, org in src.origins.items()})
    if op in ("narrow", "slice", "index_select", "gather", "take_along_dim"):
        if len(outs) != nd:
            return None
        return Derived(outs, dict(src.origins), rem)
    # getitem / index: parse the index
    idx = args[1] if len(args) > 1 else kwargs.get("indices")
    if not isinstance(idx, tuple):
        idx = (idx,)
    if op == "index" and isinstance(idx[0], (list, tuple)):
        # aten.index(self, indices): None there means "this whole dim", not a new axis
        idx = tuple(slice(None) if i is None else i for i in idx[0])
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    per_dim: list = []
    for i in idx:
        if i is Ellipsis:
            per_dim += [slice(None)] * (nd - n_real)
        else:
            per_dim.append(i)
    per_dim += [slice(None)] * (nd - sum(1 for i in per_dim if i is not None))
    org_new: dict[str, list] = {p: [] for p in src.origins}
    removed = {p: set(rem.get(p, frozenset())) for p in src.origins}
    d = 0
    tensor_seen = False
    for i in per_dim:
        if i is None:
            for p in org_new:
                org_new[p].append(frozenset())
        elif isinstance(i, int) and not isinstance(i, bool):
            for p, org in src.origins.items():
                removed[p] |= org[d]
            d += 1
        elif isinstance(i, slice):
            for p, org in src.origins.items():
                org_new[p].append(org[d])
            d += 1
        elif isinstance(i, (Const, Derived, Act)) or hasattr(i, "shape"):
            # advanced indexing by a constant index tensor (relative-position tables): the
            # indexed dim is gathered; its positions become whatever dims the index has
            shp = getattr(i, "shape", None)
            k = len(shp) if shp is not None else 1
            for p, org in src.origins.items():
                removed[p] |= org[d]
                if not tensor_seen:
                    org_new[p].extend([frozenset()] * k)
            tensor_seen = True
            d += 1
        else:
            return None
    if any(len(o) != len(outs) for o in org_new.values()):
        return None
    return Derived(outs, {p: tuple(o) for p, o in org_new.items()}, {p: frozenset(r) for p, r in removed.items()})


def _meta_shape(fn: Callable, args, kwargs):
    """Run ``fn`` on meta stand-ins to learn the output shape when the frontend does not know it."""
    def conv(v):
        if isinstance(v, (Derived, Act, Const)):
            if v.shape is None:
                raise LookupError
            return torch.empty(v.shape, device="meta")
        if isinstance(v, (list, tuple)):
            return type(v)(conv(x) for x in v)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if type(v).__name__ == "Node":
            raise LookupError
        return v

    try:
        out = fn(*conv(args), **conv(kwargs))
    except Exception:
        return None
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)) and all(isinstance(o, torch.Tensor) for o in out):
        return [tuple(o.shape) for o in out]
    return None
