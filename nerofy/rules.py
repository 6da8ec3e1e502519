"""The op rule table: what each op does with a tensor derived from a parameter, as data.

Every frontend (fx, the function-mode recorder, torch.export) reduces a call to a *canonical op
name* (``"linear"``, ``"conv_transpose2d"``, ``"matmul"``, ``"view"`` ...) and named arguments. This
module says, for that op and the argument a parameter flows into, one of:

* a **contraction** rule: which of that argument's dims are neuron dims (they survive into the
  output) and which are fan-in (contracted) — role ``neuron`` (``embedding`` for lookups);
* an **affine** role: ``gain`` (multiplies activations), ``bias`` (added, one non-trivial dim),
  ``additive`` (added or concatenated: tokens, position embeddings, relative-position tables);
* a **view**: the output is the same values re-arranged; the analyzer maps dims through it;
* **elementwise**: the output is computed elementwise from the argument (exp, sigmoid, scaling by a
  constant, weight standardisation ...), so dims map one to one after broadcasting.

Nothing here looks at a model: the rules come from what the ops compute.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# canonical names
# ---------------------------------------------------------------------------------------------
_ALIASES = {
    "truediv": "div", "floordiv": "div", "true_divide": "div", "divide": "div", "multiply": "mul",
    "subtract": "sub", "rsub": "sub", "radd": "add", "rmul": "mul", "rtruediv": "div", "rdiv": "div", "rpow": "pow",
    "rfloordiv": "div",
    "iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div", "swapaxes": "transpose",
    "swapdims": "transpose", "concat": "cat", "concatenate": "cat", "clip": "clamp",
    "_unsafe_view": "view", "unsafe_view": "view", "moveaxis": "movedim", "conv_transpose": "conv_transpose",
    "scaled_dot_product_attention": "sdpa", "_scaled_dot_product_attention": "sdpa",
    "linalg_vector_norm": "vector_norm", "alias": "identity", "detach": "identity", "data": "identity",
    "lift_fresh_copy": "identity",
    "_to_copy": "to", "clone": "identity", "contiguous": "identity", "to": "identity", "type_as": "identity",
    "float": "identity", "half": "identity", "bfloat16": "identity", "double": "identity", "type": "identity",
    "cuda": "identity", "cpu": "identity", "requires_grad_": "identity", "native_layer_norm": "layer_norm",
    "_native_batch_norm_legit_no_training": "aten_batch_norm", "_native_batch_norm_legit": "aten_batch_norm",
    "_native_batch_norm_legit_functional": "aten_batch_norm", "native_batch_norm": "aten_batch_norm",
    "native_group_norm": "aten_group_norm", "rmatmul": "rmatmul",
    "grouped_mm_fallback": "grouped_mm",  # transformers' custom op where torch's kernel is missing
}


def canonical(name: str) -> str:
    """``"__rmatmul__"`` -> ``"rmatmul"``, ``"add_"`` -> ``"add"``, ``"linear.default"`` -> ``"linear"``."""
    base = name.split(".")[0]
    stripped = base.strip("_")
    if base.endswith("_") and not base.startswith("_"):
        stripped = base[:-1]  # in-place method: add_ -> add
    if stripped.startswith("r") and stripped[1:] in ("matmul",):
        return "rmatmul"
    key = stripped if stripped in _ALIASES else base
    return _ALIASES.get(key, stripped)


# reflected operators (``1 - x`` calls ``x.__rsub__(1)``; aten's ``rsub(x, 1)`` is ``1 - x``)
_REFLECTED = {"rsub", "rtruediv", "rdiv", "rpow", "rfloordiv"}


def in_call_order(name: str, args):
    """A reflected operator's operands in the order it computes in (``sub(1, x)`` for ``1 - x``),
    so what reads them sees the op as written."""
    base = name.split(".")[0].strip("_")
    if base in _REFLECTED and isinstance(args, tuple) and len(args) == 2:
        return (args[1], args[0])
    return args


# ---------------------------------------------------------------------------------------------
# argument names, so that rules can name arguments whatever the call style
# ---------------------------------------------------------------------------------------------
SIGNATURES: dict[str, tuple[str, ...]] = {
    "linear": ("input", "weight", "bias"),
    "bilinear": ("input1", "input2", "weight", "bias"),
    **{f"conv{d}d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups") for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
       for d in (1, 2, 3)},
    "convolution": ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"),
    "_convolution": ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"),
    "matmul": ("input", "other"), "mm": ("input", "mat2"), "bmm": ("input", "mat2"), "mv": ("input", "vec"),
    "rmatmul": ("other", "input"),  # rmatmul(self, other) computes other @ self
    "dot": ("input", "other"), "inner": ("input", "other"), "outer": ("input", "vec2"),
    "addmm": ("bias", "input", "mat2"), "baddbmm": ("bias", "input", "mat2"), "addbmm": ("bias", "input", "mat2"),
    "addmv": ("bias", "input", "vec"),
    "embedding": ("input", "weight"), "aten_embedding": ("weight", "input"),
    "embedding_bag": ("input", "weight"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "aten_group_norm": ("input", "weight", "bias"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "instance_norm": ("input", "running_mean", "running_var", "weight", "bias"),
    "aten_batch_norm": ("input", "weight", "bias", "running_mean", "running_var"),
    "aten_instance_norm": ("input", "weight", "bias", "running_mean", "running_var"),
    "prelu": ("input", "weight"),
    "addcmul": ("input", "tensor1", "tensor2"), "addcdiv": ("input", "tensor1", "tensor2"),
    "lerp": ("input", "end", "weight"),
    "sdpa": ("query", "key", "value", "attn_mask"),
    "einsum": ("equation",),
    "grouped_mm": ("mat_a", "mat_b", "offs", "bias", "out_dtype"),
    "tensordot": ("a", "b", "dims"), "aten_tensordot": ("a", "b", "dims_a", "dims_b"),
    "multi_head_attention_forward": ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
                                     "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p",
                                     "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
                                     "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
                                     "k_proj_weight", "v_proj_weight", "static_k", "static_v"),
}
# F.multi_head_attention_forward (nn.MultiheadAttention's functional form): projections are
# (out, in) weights; bias_k/bias_v are learned key/value tokens appended to the sequence
MHA_ARGS = {"in_proj_weight": "weight", "out_proj_weight": "weight", "q_proj_weight": "weight",
            "k_proj_weight": "weight", "v_proj_weight": "weight", "in_proj_bias": "bias", "out_proj_bias": "bias",
            "bias_k": "additive", "bias_v": "additive", "query": "additive", "key": "additive", "value": "additive",
            "static_k": "additive", "static_v": "additive", "attn_mask": "additive"}

# aten ops whose argument order differs from torch.nn.functional's: renamed by the export frontend
ATEN_RENAMES = {"embedding": "aten_embedding", "batch_norm": "aten_batch_norm", "instance_norm": "aten_instance_norm",
                "tensordot": "aten_tensordot"}


def bind(op: str, args: tuple, kwargs: dict) -> dict:
    """Name the arguments of a call by the op's signature (unknown ops: arg0, arg1, ...)."""
    names = SIGNATURES.get(op, ())
    out = {}
    for i, a in enumerate(args):
        out[names[i] if i < len(names) else f"arg{i}"] = a
    out.update(kwargs)
    return out


# ---------------------------------------------------------------------------------------------
# op classes
# ---------------------------------------------------------------------------------------------
# the argument of a weighted op that carries data: a parameter there is a learned input (latents,
# queries), not a weight
DATA_SLOT = {"linear": "input", "bilinear": "input1", "convolution": "input", "_convolution": "input",
             **{f"conv{d}d": "input" for d in (1, 2, 3)}, **{f"conv_transpose{d}d": "input" for d in (1, 2, 3)}}

NORMS = {"layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm", "aten_batch_norm",
         "aten_instance_norm", "aten_group_norm"}

# view ops: output values are input values re-arranged (dims mapped by the analyzer)
PERMUTES = {"t", "T", "mT", "H", "mH", "transpose", "permute", "movedim", "adjoint", "numpy_T"}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "ravel"}
EXPANDS = {"expand", "expand_as", "broadcast_to", "unsqueeze", "squeeze", "repeat", "tile", "atleast_2d", "atleast_3d",
           "repeat_interleave"}
SPLITS = {"chunk", "split", "tensor_split", "unbind", "split_with_sizes", "unsafe_split", "unsafe_chunk"}
SELECTS = {"getitem", "select", "narrow", "slice", "index_select", "index", "gather", "take_along_dim"}
IDENTITY = {"identity"}

# elementwise ops: dims map one to one after broadcasting
ELEMENTWISE_UNARY = {
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sigmoid", "tanh", "relu", "relu6", "gelu", "silu", "elu",
    "softplus", "neg", "abs", "sqrt", "rsqrt", "square", "pow", "clamp", "clamp_min", "clamp_max", "sign",
    "reciprocal", "sin", "cos", "softsign", "hardtanh", "hardsigmoid", "hardswish", "mish", "leaky_relu", "logsigmoid",
    "erf", "round", "floor", "ceil", "trunc", "frac", "nan_to_num", "sgn", "tanhshrink", "softshrink", "threshold",
    "celu", "selu", "glu", "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
    "softmax", "log_softmax", "normalize", "roll", "flip", "fliplr", "flipud", "pad", "interpolate", "upsample",
    "cumsum", "cumprod", "logit", "float_power", "positive", "masked_fill", "where", "triu", "tril", "fill_diagonal",
    "softmin", "native_dropout", "constant_pad_nd", "upsample_bilinear2d", "upsample_bicubic2d",
    "upsample_nearest2d", "grid_sample", "rot90",
}
ELEMENTWISE_BINARY = {"mul", "div", "add", "sub", "maximum", "minimum", "pow", "fmod", "remainder", "atan2", "hypot",
                      "copysign", "lerp", "addcmul", "addcdiv",
                      # torch's weight norm, v * g / ||v||: g (size 1 but on `dim`) broadcasts onto v
                      "weight_norm"}
MULTIPLICATIVE = {"mul", "div"}
ADDITIVE_OPS = {"add", "sub"}
CONCATS = {"cat", "stack", "hstack", "vstack", "dstack", "column_stack"}
# ops that write values into (a copy of) their first argument: x[:, 0] = token, index_put, scatters
WRITES = {"setitem", "copy", "index_put", "index_copy", "index_add", "slice_scatter", "select_scatter",
          "diagonal_scatter", "masked_scatter", "scatter", "scatter_add", "scatter_reduce", "put"}
# reductions over some dims of a derived tensor (weight standardisation computes these)
REDUCTIONS = {"mean", "sum", "std", "var", "norm", "vector_norm", "amax", "amin", "max", "min", "std_mean",
              "var_mean", "logsumexp", "prod", "nansum", "nanmean", "median", "frobenius_norm"}
# sums over dims: after a parameter multiplied activations elementwise, a sum over the parameter's
# own dims makes the pair a dot product (GAT's attention vectors, (h * v).sum(-1) scorers)
SUMS = {"sum", "mean", "nansum", "nanmean"}
# ops that only read shape/dtype or make a tensor "like" the argument: no value flows
SHAPE_ONLY = {"size", "dim", "ndim", "numel", "shape", "zeros_like", "ones_like", "empty_like", "full_like",
              "randn_like", "rand_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
              "is_floating_point", "element_size", "dtype", "device", "is_contiguous", "stride",
              "data_ptr", "nelement", "requires_grad", "is_complex", "storage_offset", "ne", "eq", "isnan",
              "isinf", "isfinite", "any", "all", "gt", "lt", "ge", "le", "argmax", "argmin", "is_nonzero",
              "sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata", "empty_strided",
              # autograd bookkeeping module.to()/_apply reads on each parameter: not a use of its values
              "grad", "has_compatible_shallow_copy_type", "is_leaf", "grad_fn", "_version",
              # metadata queries (MultiheadAttention's fast-path checks read them): no values
              "is_nested", "is_sparse", "is_quantized", "is_meta", "is_cuda", "is_cpu", "is_mkldnn", "layout",
              "is_inference", "is_mps", "is_xpu"}
# products of two parameters with no activation in between (W + B @ A, a factorised weight): the
# result is a weight made of both, and its consumer decides each factor's neuron axes
PARAM_PRODUCTS = {"matmul", "mm", "bmm", "mv"}


EMBEDDINGS = {"embedding", "aten_embedding", "embedding_bag"}
# products that, between two activations, compare them (q @ k^T: logits)
PAIR_PRODUCTS = {"matmul", "mm", "bmm", "rmatmul", "einsum", "baddbmm"}
# ops after which logits are still logits (scaled, shifted or masked)
LOGIT_PRESERVING = {"mul", "div", "add", "sub", "neg", "masked_fill", "where", "clamp", "nan_to_num"}


def output_feature(op: str, argname: str, weight_nd: int) -> int | None:
    """The output dim (negative: from the end) that holds the neurons of a contraction's weight
    ``argname``: the feature dim of what the op computes. None where no single dim does."""
    if op in ("linear", "bilinear") and argname == "weight":
        return -1
    if re.fullmatch(r"conv(_transpose)?[123]d|_?convolution", op) and argname == "weight" and weight_nd >= 3:
        return -(weight_nd - 1)  # (N, C_out, *spatial): the channel dim
    if op in ("matmul", "mm", "addmm", "rmatmul") and weight_nd == 2:
        if argname in ("other", "mat2"):
            return -1  # x @ W
        if argname == "input":
            return -2  # W @ x
    return None


@dataclass(frozen=True)
class Contraction:
    """Result of a contraction rule for one argument: dims of that argument."""

    neuron: tuple[int, ...]
    fan_in: tuple[int, ...]
    role: str = "neuron"
    split_axis: int | None = None  # a fan-in dim split into `groups` blocks, each its own neurons
    groups: int = 1


def _nd(shape) -> int:
    return len(shape)


def matmul_operand(shape, side: str, other_ndim: int | None = None) -> Contraction:
    """``A @ B``: A (..., n, k) contracts its last dim; B (..., k, m) its second-to-last.

    Batch dims and the surviving matrix dim are neuron dims: a stack of per-expert or per-head
    weight matrices is a stack of independent neuron sets.
    """
    nd = _nd(shape)
    if nd == 1:
        return Contraction(neuron=(), fan_in=(0,))
    contracted = nd - 1 if side == "left" else nd - 2
    return Contraction(neuron=tuple(d for d in range(nd) if d != contracted), fan_in=(contracted,))


def conv_weight(shape, groups: int = 1, transposed: bool = False) -> Contraction:
    """conv: (out, in/g, *k) -> neurons on dim 0. conv_transpose: (in, out/g, *k) -> neurons on dim 1
    plus the group index of dim 0 (each output channel sees only its group's input channels)."""
    nd = _nd(shape)
    if not transposed:
        return Contraction(neuron=(0,), fan_in=tuple(range(1, nd)))
    return Contraction(neuron=(1,), fan_in=(0,) + tuple(range(2, nd)),
                       split_axis=0 if groups > 1 else None, groups=max(1, int(groups)))


def tensordot_operand(shape, first: bool, dims) -> Contraction | None:
    """``tensordot(a, b, dims)``: ``dims=n`` contracts a's last n dims with b's first n; a pair of
    lists names them. The operand's other dims survive into the output: neurons."""
    nd = _nd(shape)
    if isinstance(dims, int):
        contracted = range(nd - dims, nd) if first else range(dims)
    elif isinstance(dims, (list, tuple)) and len(dims) == 2 and all(isinstance(d, (list, tuple, int)) for d in dims):
        mine = dims[0] if first else dims[1]
        contracted = [mine] if isinstance(mine, int) else mine
    else:
        return None
    fan_in = sorted({int(d) % nd for d in contracted}) if nd else []
    if not fan_in:
        return None
    return Contraction(neuron=tuple(d for d in range(nd) if d not in fan_in), fan_in=tuple(fan_in))


_EINSUM_RE = re.compile(r"\s+")


def einsum_operand(equation: str, index: int, ndim: int, data: set[int] | None = None) -> Contraction | None:
    """Neuron dims of operand ``index``: its subscripts that survive into the output.

    ``data``: which operands carry activations. A subscript contracted only with other weights
    (the rank index ``r`` of ``u`` in ``'bi,ir,ro->bo'``) indexes this factor's outputs, so it is a
    neuron dim too; fan-in is what meets the data. Implicit-output equations (no ``->``) keep the
    subscripts that appear once, sorted; an ellipsis counts as surviving batch dims when the
    output keeps it.
    """
    eq = _EINSUM_RE.sub("", equation)
    if "->" in eq:
        lhs, out = eq.split("->")
    else:
        lhs = eq
        letters = [c for c in lhs if c.isalpha()]
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
        if "..." in lhs:
            out = "..." + out
    terms = lhs.split(",")
    if index >= len(terms):
        return None
    term = terms[index]
    dims: list[str] = []
    if "..." in term:
        pre, post = term.split("...")
        n_ell = ndim - len(pre) - len(post)
        dims = list(pre) + ["..."] * n_ell + list(post)
    else:
        dims = list(term)
    if len(dims) != ndim:
        return None
    # A subscript contracted only with other weights links two factors of a chain
    # (x -> u -> v in 'bi,ir,ro->bo'). It is the output (neuron) index of the factor that meets the
    # data, and the fan-in of the factor that does not.
    data_subs = None
    if data:
        data_subs = set().union(*[set(terms[i]) for i in data if i < len(terms) and i != index])
    meets_data = data_subs is not None and any(s in data_subs for s in dims if s != "..." and s not in out)
    neuron, fan_in = [], []
    for d, s in enumerate(dims):
        survives = s in out if s != "..." else "..." in out
        if not survives and meets_data and s != "..." and s not in data_subs:
            survives = True
        (neuron if survives else fan_in).append(d)
    if not fan_in:  # nothing contracted: the operand is scaled, not contracted (a gain)
        return Contraction(neuron=tuple(neuron), fan_in=(), role="gain")
    return Contraction(neuron=tuple(neuron), fan_in=tuple(fan_in))


def contraction(op: str, argname: str, shape: tuple[int, ...], bound: dict, operand_index: int | None = None
                ) -> Contraction | str | None:
    """The rule for a parameter-derived tensor of ``shape`` passed as ``argname`` to ``op``.

    Returns a Contraction, an affine role name (``"gain"``, ``"bias"``, ``"additive"``,
    ``"passthrough"`` for a norm's input), or None when the op has no rule for that argument.
    """
    if op in ("linear",):
        if argname == "weight":
            return Contraction(neuron=(0,), fan_in=(1,)) if len(shape) == 2 else Contraction((), (0,))
        if argname == "bias":
            return "bias"
        if argname == "input":
            return matmul_operand(shape, "left")
    if op == "bilinear":
        if argname == "weight":
            return Contraction(neuron=(0,), fan_in=(1, 2))
        if argname == "bias":
            return "bias"
    if re.fullmatch(r"conv[123]d", op):
        if argname == "weight":
            return conv_weight(shape)
        if argname == "bias":
            return "bias"
    if re.fullmatch(r"conv_transpose[123]d", op):
        if argname == "weight":
            return conv_weight(shape, int(bound.get("groups", 1) or 1), transposed=True)
        if argname == "bias":
            return "bias"
    if op in ("convolution", "_convolution"):
        if argname == "weight":
            return conv_weight(shape, int(bound.get("groups", 1) or 1), bool(bound.get("transposed", False)))
        if argname == "bias":
            return "bias"
    if op == "inner" and argname in ("input", "other") and shape:  # both operands contract their last dim
        return Contraction(neuron=tuple(range(len(shape) - 1)), fan_in=(len(shape) - 1,))
    if op == "tensordot" and argname in ("a", "b"):
        return tensordot_operand(shape, argname == "a", bound.get("dims", 2))
    if op == "aten_tensordot" and argname in ("a", "b"):
        return tensordot_operand(shape, argname == "a", (bound.get("dims_a"), bound.get("dims_b")))
    if op in ("matmul", "mm", "bmm", "rmatmul", "mv", "dot"):
        if argname == "input":
            return matmul_operand(shape, "left")
        if argname in ("other", "mat2", "vec"):
            return matmul_operand(shape, "right")
    if op in ("addmm", "baddbmm", "addbmm", "addmv"):
        if argname == "bias":
            return "bias"
        rule = None
        if argname == "input":
            rule = matmul_operand(shape, "left")
        if argname in ("mat2", "vec"):
            rule = matmul_operand(shape, "right")
        if rule is not None and op == "addbmm" and len(shape) == 3:  # sums the batch of products: dim 0 is fan-in
            rule = Contraction(neuron=tuple(d for d in rule.neuron if d != 0), fan_in=(0,) + rule.fan_in)
        return rule
    if op == "grouped_mm":  # MoE experts: per-group matmuls, groups on dim 0 of a 3D operand
        if argname == "bias":
            return "bias"
        left = argname in ("mat_a", "self", "input")
        if not left and argname not in ("mat_b", "mat2", "weight"):
            return None
        other = bound.get("mat_b" if left else "mat_a", bound.get("mat2" if left else "self"))
        if len(shape) == 3 or len(getattr(other, "shape", None) or ()) == 3:
            return matmul_operand(shape, "left" if left else "right")
        # both 2D (the weight-gradient form): the contracted dim itself is cut into groups by offs
        return None
    if op == "einsum" and operand_index is not None:
        return einsum_operand(bound["equation"], operand_index, len(shape))
    if op in ("embedding", "aten_embedding", "embedding_bag") and argname == "weight":
        return Contraction(neuron=(0,), fan_in=tuple(range(1, len(shape))), role="embedding")
    if op in NORMS:
        if argname == "input":
            return "passthrough"
        if argname == "weight":
            return "gain"
        if argname == "bias":
            return "bias"
    if op == "prelu" and argname == "weight":
        return "gain"
    if op == "sdpa" and argname == "attn_mask":
        return "additive"
    if op == "multi_head_attention_forward" and argname in MHA_ARGS:
        kind = MHA_ARGS[argname]
        if kind == "weight":
            return Contraction(neuron=(0,), fan_in=(1,)) if len(shape) == 2 else None
        return kind
    return None


def affine_role(op: str, shape: tuple[int, ...]) -> str:
    """Role of a parameter combined elementwise with activations."""
    if op in MULTIPLICATIVE or op == "addcmul_factor":
        return "gain"
    if op in CONCATS:
        return "additive"
    nontrivial = sum(1 for s in shape if s != 1)
    return "bias" if nontrivial <= 1 else "additive"


# ---------------------------------------------------------------------------------------------
# dims through reshapes
# ---------------------------------------------------------------------------------------------
def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of ``src`` dims with runs of ``dst`` dims of equal product (size-1 dims dropped).

    ``(6, 4) -> (2, 3, 4)`` gives ``[([0], [0, 1]), ([1], [2])]``. None if the sizes do not match.
    """
    if math.prod(src) != math.prod(dst):
        return None
    s_idx = [i for i, s in enumerate(src) if s != 1]
    d_idx = [i for i, s in enumerate(dst) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(s_idx) and j < len(d_idx):
        gs, gd = [s_idx[i]], [d_idx[j]]
        ps, pd = src[s_idx[i]], dst[d_idx[j]]
        i += 1
        j += 1
        while ps != pd:
            if ps < pd:
                if i >= len(s_idx):
                    return None
                gs.append(s_idx[i]); ps *= src[s_idx[i]]; i += 1
            else:
                if j >= len(d_idx):
                    return None
                gd.append(d_idx[j]); pd *= dst[d_idx[j]]; j += 1
        groups.append((gs, gd))
    if i != len(s_idx) or j != len(d_idx):
        return None
    return groups
