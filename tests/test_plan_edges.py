"""Edge cases of tracing, planning and checking found by the zoo sweeps and the ecosystem tests."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy
from nerofy.balanced import _BalancedFn
from nerofy.check import check_model
from nerofy.layout import NeuronLayout
from nerofy.plan import make_plan, positional_inputs
from nerofy.verify import verify_axes


class RoutedExperts(nn.Module):
    """Per-example expert weights picked by data (W[idx]) and contracted: routed neurons."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.w_in = nn.Parameter(torch.randn(4, 8, 16))
        self.w_out = nn.Parameter(torch.randn(4, 16, 8))
        self.table = nn.Parameter(torch.randn(10, 8))

    def forward(self, x, ids):
        x = x + self.table[ids]  # indexing by data, then added: an embedding
        e = self.router(x).argmax(-1)
        h = torch.bmm(x.unsqueeze(1), self.w_in[e]).squeeze(1)
        return torch.einsum("bi,bio->bo", h, self.w_out.index_select(0, e))


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_routed_expert_weights_are_neurons_and_indexed_rows_an_embedding(frontend):
    inputs = (torch.randn(5, 8), torch.randint(0, 10, (5,)))
    plan = make_plan(RoutedExperts(), inputs, frontends=(frontend,))
    assert (plan["w_in"].role, plan["w_in"].axes, plan["w_in"].fan_in) == ("neuron", (0, 2), 8)
    assert (plan["w_out"].role, plan["w_out"].axes, plan["w_out"].fan_in) == ("neuron", (0, 2), 16)
    assert (plan["table"].role, plan["table"].axes) == ("embedding", (0,))


class GroupedExperts(nn.Module):
    """Experts stored (E, out, in) and run as one grouped matmul over tokens sorted by expert (the
    Mixture-of-Experts kernel of Hugging Face's Mixtral/Qwen-MoE)."""

    def __init__(self, e=4, d=8, h=12):
        super().__init__()
        self.up = nn.Parameter(torch.randn(e, h, d) / d**0.5)
        self.down = nn.Parameter(torch.randn(e, d, h) / h**0.5)

    def forward(self, x, counts):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = F.grouped_mm(x, self.up.transpose(-2, -1), offs=offs).relu()
        return F.grouped_mm(h, self.down.transpose(-2, -1), offs=offs)


# (torch.export's meta kernel for grouped_mm takes bf16 only; the rule test below covers aten's names)
@pytest.mark.parametrize("frontend", ["fx", "record"])
def test_grouped_mm_experts_are_neurons_per_expert(frontend):
    inputs = (torch.randn(10, 8), torch.tensor([3, 0, 5, 2]))
    model = GroupedExperts()
    plan = make_plan(model, inputs, frontends=(frontend,))
    assert plan.frontend == frontend
    assert (plan["up"].role, plan["up"].axes, plan["up"].fan_in) == ("neuron", (0, 1), 8)
    assert (plan["down"].role, plan["down"].axes, plan["down"].fan_in) == ("neuron", (0, 1), 12)
    res = verify_axes(model, plan, inputs)
    assert {k: v.status for k, v in res.items()} == {"up": "ok", "down": "ok"}


def test_grouped_mm_rule_follows_the_operand_shapes():
    from nerofy import rules as R

    class Op:  # an argument as the analyzer binds it: only its shape is read
        def __init__(self, *shape):
            self.shape = shape

    w3, x2, x3, w2 = Op(4, 8, 12), Op(10, 8), Op(4, 5, 8), Op(8, 12)
    assert R.contraction("grouped_mm", "mat_b", w3.shape, {"mat_a": x2, "mat_b": w3}) == R.Contraction((0, 2), (1,))
    assert R.contraction("grouped_mm", "mat_a", x3.shape, {"mat_a": x3, "mat_b": w2}) == R.Contraction((0, 1), (2,))
    assert R.contraction("grouped_mm", "mat_b", w2.shape, {"mat_a": x3, "mat_b": w2}) == R.Contraction((1,), (0,))
    assert R.contraction("grouped_mm", "mat2", w3.shape, {"self": x2, "mat2": w3}) == R.Contraction((0, 2), (1,))
    # both 2D: offs cuts the contracted dim itself, so no dim is a whole fan-in
    assert R.contraction("grouped_mm", "mat_b", w2.shape, {"mat_a": x2, "mat_b": w2}) is None
    assert R.canonical("grouped_mm_fallback") == R.canonical("_grouped_mm") == "grouped_mm"


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_weight_norm_direction_is_the_neuron_and_its_magnitude_a_gain(frontend):
    """torch's weight norm, v * g / ||v||: v holds the neurons; g is a gain, whether it is one value per
    output (dim=0) or one per input column shared by every neuron (dim=1)."""
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(8, 16)), nn.ReLU(), weight_norm(nn.Linear(16, 4), dim=1))
    plan = make_plan(model, (torch.randn(4, 8),), frontends=(frontend,))
    assert plan.frontend == frontend
    for i in (0, 2):
        g, v = plan[f"{i}.parametrizations.weight.original0"], plan[f"{i}.parametrizations.weight.original1"]
        assert (v.role, v.axes, v.fan_in) == ("neuron", (0,), v.shape[1]), v
        assert g.role == "gain", g
    assert "shared by all 4 neurons" in plan["2.parametrizations.weight.original0"].reason


class TiedConvDecoder(nn.Module):
    """A conv's weight reused by a transposed conv (a tied decoder): the uses disagree on the axis."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return F.conv_transpose2d(F.relu(self.enc(x)), self.enc.weight, padding=1)


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_disagreeing_uses_resolve_to_the_first_use_in_forward(frontend):
    """fx reads nn.Conv2d through its module rule: that use must still count in graph order."""
    inputs = (torch.randn(2, 3, 8, 8),)
    model = TiedConvDecoder()
    plan = make_plan(model, inputs, frontends=(frontend,))
    e = plan["enc.weight"]
    assert (e.role, e.axes) == ("neuron", (0,)), e
    assert any("first use" in w for w in e.warnings)
    assert verify_axes(model, plan, inputs)["enc.weight"].status == "ok"


class InPlacePositions(nn.Module):
    """A position table built in place (torchvision's MViT: pos.add_(spatial)); later uses of the
    mutated tensor carry every parameter that flowed in."""

    def __init__(self):
        super().__init__()
        self.temporal = nn.Parameter(torch.randn(2, 8))
        self.spatial = nn.Parameter(torch.randn(3, 8))
        self.extra = nn.Parameter(torch.randn(6, 8))
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        pos = torch.repeat_interleave(self.temporal, 3, dim=0)
        pos.add_(self.spatial.repeat(2, 1))
        pos += self.extra
        return self.proj(x + pos)


class WrittenToken(nn.Module):
    """A class token written into the sequence by item assignment."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Parameter(torch.randn(8))
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        x = x.clone()
        x[:, 0] = self.tok
        return self.proj(x)


@pytest.mark.parametrize("frontend", ["record", "export"])  # fx cannot trace item assignment on a Proxy
def test_values_written_into_activations_are_additive(frontend):
    plan = make_plan(WrittenToken(), (torch.randn(2, 5, 8),), frontends=(frontend,))
    assert plan.frontend == frontend
    assert plan["tok"].role == "additive" and "written into activations" in plan["tok"].reason


@pytest.mark.parametrize("frontend", ["fx", "record", "export"])
def test_in_place_updates_carry_what_flowed_in(frontend):
    plan = make_plan(InPlacePositions(), (torch.randn(2, 6, 8),), frontends=(frontend,))
    assert plan.frontend == frontend
    assert {n: plan[n].role for n in ("temporal", "spatial", "extra")} == dict.fromkeys(
        ("temporal", "spatial", "extra"), "additive")


def test_tensor_that_only_lends_its_dtype_carries_no_values():
    class OneHot(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(2, 16, 8))
            self.fc = nn.Linear(8, 4)

        def forward(self, pos):
            oh = F.one_hot(pos, 16).permute(0, 2, 1, 3).to(self.table)  # x.to(W): dtype only
            return self.fc((oh @ self.table).sum(1))

    e = nerofy.plan(OneHot(), (torch.randint(0, 16, (3, 5, 2)),))["table"]
    assert (e.role, e.axes, e.fan_in, e.warnings) == ("neuron", (0, 2), 16, [])


def test_model_that_cannot_be_copied_to_meta_is_traced_directly():
    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()  # deepcopy fails on this
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return x @ self.w

    plan = nerofy.plan(Locked())
    assert plan.attempts[0][0] == "meta-copy" and "pickle" in plan.attempts[0][1]
    assert plan.frontend == "fx" and (plan["w"].role, plan["w"].axes) == ("neuron", (1,))


def test_no_frontend_and_no_rule_is_fail_trace():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            if x.sum() > 0:  # value-dependent: fx cannot trace; no inputs for the others
                return x @ self.w
            return x

    r = check_model(Opaque(), (torch.ones(2, 4),), plan=make_plan(Opaque()), verify=False)
    assert r.status == "fail_trace" and "w" in r.error and "no frontend traced" in r.error


def test_verify_widens_its_sample_for_weights_used_in_pieces():
    class Chunked(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(12, 8))
            self.v = nn.Parameter(torch.randn(8, 6))

        def forward(self, x):
            a, b, _ = self.w.chunk(3, 0)
            return F.linear(x, a).sum() + F.linear(x, b).sum() + (x @ self.v).sum()

    m, x = Chunked(), torch.randn(3, 8)
    plan = nerofy.plan(m, (x,))
    res = verify_axes(m, plan, (x,))
    assert res["w"].status == "ok" and res["v"].status == "ok"
    plan.override("v", axis=0)  # wrong on purpose: input rows are not independent outputs
    assert verify_axes(m, plan, (x,))["v"].status == "fail"


def test_default_inputs_follow_a_timm_models_own_img_size():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        m = timm.create_model("vit_tiny_patch16_224", img_size=64)
    plan = nerofy.plan(m)
    assert plan.attempts == [("fx", "ok")] and not plan.warnings


def test_plan_of_a_wrapped_model_is_the_plan_it_was_wrapped_with():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    plan = nerofy.plan(m)
    m, _ = nerofy.wrap(m, plan=plan)
    assert nerofy.plan(m) is plan


@pytest.mark.parametrize("layout, shape, scale", [
    (NeuronLayout((0,)), (5, 3, 2, 2), 1.0),
    (NeuronLayout((1,), split_axis=0, groups=2), (6, 4, 3), 0.7),
    (NeuronLayout((0, 2)), (3, 4, 5), 2.0),
    (NeuronLayout((0,), center=False), (5, 7), 1.3),
])
def test_balanced_backward_is_the_exact_projected_gradient(layout, shape, scale):
    v = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _BalancedFn.apply(t, layout, scale), (v,))
    torch.testing.assert_close(_BalancedFn.apply(v, layout, scale), layout.project(v) * scale)


def test_wrap_refuses_a_plan_that_leaves_parameters_out():
    from nerofy.plan import Plan

    m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    partial = Plan([e for e in nerofy.plan(m) if not e.name.startswith("1.")])
    with pytest.raises(ValueError, match="no entry for 2 of this model's parameters"):
        nerofy.wrap(m, plan=partial)
    assert not nerofy.is_wrapped(m)


def test_sampled_verify_checks_one_parameter_per_repeated_layer():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4)]
    m = nn.Sequential(nn.Linear(8, 16), *blocks, nn.Linear(16, 3))
    x = torch.randn(4, 8)
    plan = make_plan(m, (x,))
    full = verify_axes(m, plan, (x,))
    sampled = verify_axes(m, plan, (x,), sample=True)
    assert len(full) == 6 and all(v.status == "ok" for v in full.values())
    # three distinct (type, attr, shape, axes): 8->16, 16->16 (four times), 16->3
    assert sorted(sampled) == ["0.weight", "1.0.weight", "5.weight"]
    assert all(v.status == "ok" for v in sampled.values())
    r = check_model(m, (x,), steps=1, verify="sample")
    assert r.status == "pass" and r.axes == {"ok": 3, "fail": 0, "unverified": 0, "sampled_out": 3}
    with pytest.raises(ValueError, match="verify must be"):
        check_model(m, (x,), verify="some")


class OptionalMask(nn.Module):
    """forward(x, mask=None, *, scale=False): the branches the call without them never takes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x, mask=None, *, double=False):
        if mask is not None:
            x = x * mask.view(x.shape[0], -1)
        y = self.fc(x)
        return y * 2 if double else y


def test_fx_traces_arguments_left_at_constant_defaults_as_constants():
    plan = make_plan(OptionalMask(), (torch.randn(3, 8),))
    assert plan.frontend == "fx" and plan.attempts == [("fx", "ok")]
    assert (plan["fc.weight"].role, plan["fc.weight"].axes) == ("neuron", (0,))


class CpuIndexGraph(nn.Module):
    """fx traces it, but neither the fx graph nor the recorder runs on meta: forward makes its edge
    index with torch.arange on the CPU and index_add_ refuses to mix it with meta tensors."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        src = torch.arange(x.shape[0])
        dst = (src + 1) % x.shape[0]
        h = self.lin(x)
        agg = torch.zeros_like(h).index_add_(0, dst, h[src])
        return self.out(F.relu(agg + h))


def test_graph_that_runs_on_no_meta_frontend_is_recorded_from_one_real_forward():
    x = torch.randn(6, 8)
    p = make_plan(CpuIndexGraph(), (x,))
    assert p.frontend == "record"
    assert any(f == "fx" and "did not run on meta" in msg for f, msg in p.attempts)
    assert any("recorded one real forward" in w for w in p.warnings)
    assert not any("shapes unknown" in w for w in p.warnings)
    assert [(e.name, e.role, e.axes) for e in p if e.role == "neuron"] == [("lin.weight", "neuron", (0,)),
                                                                           ("out.weight", "neuron", (0,))]
    r = check_model(CpuIndexGraph(), (x,), steps=2, plan=p)
    assert r.status == "pass" and r.axes["fail"] == 0, r.error


class OptionalBranch(nn.Module):
    """``seg`` is used only when the caller passes segment ids (XLNet's seg_embed, BERT-style options)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.seg = nn.Parameter(torch.randn(2, 8))

    def forward(self, x, seg_ids=None):
        h = self.lin(x)
        return h + self.seg[seg_ids] if seg_ids is not None else h


def test_parameter_the_forward_does_not_use_is_free_with_the_reason_and_the_fix():
    x = torch.randn(3, 8)
    p = make_plan(OptionalBranch(), (x,))
    e = p["seg"]
    assert e.role == "free" and "not used" in e.reason
    assert any(w.startswith("seg: not used by the forward with these inputs") and "plan.override" in w
               for w in p.warnings)
    assert any("1 parameters are not used by the forward" in w for w in p.warnings)
    assert not any("no rule anywhere" in w for w in p.warnings)
    p2 = make_plan(OptionalBranch(), (x, torch.tensor([0, 1, 1])))
    assert p2["seg"].role == "embedding"


class CastsItsRouter(nn.Module):
    """Casts a submodule inside forward (SwitchTransformers' router does): module.to() reads each
    parameter's .data, .grad and shallow-copy compatibility, which are not uses of its values."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        self.router = self.router.to(x.dtype)
        gate = self.router(x).softmax(-1).amax(-1, keepdim=True)
        if gate.sum().item() > 0:  # data-dependent: fx cannot trace it, the recorder follows it
            x = x * gate
        return self.out(x)


def test_module_to_inside_forward_is_not_a_use_of_the_weights():
    x = torch.randn(3, 8)
    p = make_plan(CastsItsRouter(), (x,))
    assert p.frontend == "record"
    assert (p["router.weight"].role, p["router.weight"].axes) == ("neuron", (0,))
    assert not any("no rule applies" in w for w in p.warnings), p.warnings


class StackedExperts(nn.Module):
    """Per-expert weights kept as separate parameters and stacked in forward, along a new leading
    dim (then bmm) or a new last dim (then einsum)."""

    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(6, 8) / 3) for _ in range(3)])  # (out, in)
        self.vs = nn.ParameterList([nn.Parameter(torch.randn(6, 5) / 3) for _ in range(3)])  # (in, out)

    def forward(self, x):  # (3, b, 8)
        h = torch.bmm(x, torch.stack(list(self.ws)).transpose(1, 2))  # (e, b, 6)
        v = torch.stack(list(self.vs), dim=-1)  # (in 6, out 5, e)
        return torch.einsum("ebi,ioe->ebo", F.relu(h), v)


def test_weights_stacked_in_forward_keep_their_own_neuron_axes():
    x = torch.randn(3, 4, 8)
    p = make_plan(StackedExperts(), (x,))
    for i in range(3):
        assert (p[f"ws.{i}"].role, p[f"ws.{i}"].axes) == ("neuron", (0,))
        assert (p[f"vs.{i}"].role, p[f"vs.{i}"].axes) == ("neuron", (1,))  # the einsum contracts their dim 0
    r = check_model(StackedExperts(), (x,), steps=2, plan=p)
    assert r.status == "pass", r.error


class KeywordForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(20, 8)
        self.seg = nn.Embedding(2, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *, scale=1.0):
        h = self.tok(input_ids)
        if token_type_ids is not None:
            h = h + self.seg(token_type_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.out(h) * scale


def test_dict_example_inputs_are_keyword_inputs_bound_to_forward():
    ids = torch.randint(0, 20, (2, 5))
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}  # attention_mask omitted: its default
    p = make_plan(KeywordForward(), batch)
    # reached by the trace: token_type_ids went to the right parameter (positionally, only the
    # module rule would have placed it)
    assert (p["seg.weight"].role, p["seg.weight"].frontend) == ("embedding", p.frontend)
    assert (p["out.weight"].role, p["out.weight"].axes) == ("neuron", (0,))
    p_pos = make_plan(KeywordForward(), (ids,))
    assert p_pos["seg.weight"].frontend == "modules" and "not reached" in p_pos["seg.weight"].reason
    r = check_model(KeywordForward(), batch, steps=2, plan_inputs=batch)
    assert r.status == "pass", r.error
    model, opt = nerofy.wrap(KeywordForward(), example_inputs=batch)
    assert nerofy.is_wrapped(model) and model(**batch).shape == (2, 5, 3)


def test_dict_example_inputs_with_a_keyword_only_key_are_one_keyword_call():
    from nerofy.trace import CallInputs

    ids = torch.randint(0, 20, (2, 5))
    batch = {"input_ids": ids, "scale": 2.0}
    got = positional_inputs(KeywordForward(), batch)
    assert isinstance(got, CallInputs) and got.args == () and got.kwargs == batch
    p = make_plan(KeywordForward(), batch)
    assert p.frontend != "fx" and (p["out.weight"].role, p["out.weight"].axes) == ("neuron", (0,))
    assert ("fx", "skipped: keyword inputs (a symbolic trace takes positional inputs only)") in p.attempts


@pytest.mark.parametrize("batch, match", [
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2)}, "'labels' name no parameter"),
    ({"input_idz": torch.zeros(2, 5, dtype=torch.long)}, r"'input_idz'.*close: input_ids"),
    ({"attention_mask": torch.ones(2, 5)}, "lacks 'input_ids'"),
    ({"attention_mask": torch.ones(2, 5), "scale": 2.0}, "lacks 'input_ids'"),
])
def test_dict_example_inputs_that_do_not_bind_name_the_key(batch, match):
    with pytest.raises(ValueError, match=match):
        make_plan(KeywordForward(), batch)


class HandNormalized(nn.Module):
    """A weight divided by a statistic of itself (hand-written weight normalization, cosine layers)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.g = nn.Parameter(torch.ones(6, 1))

    def forward(self, x):
        return F.linear(x, self.g * self.w / self.w.norm(dim=1, keepdim=True))


def test_weight_scaled_by_a_statistic_of_itself_is_one_neuron_use_without_warnings():
    p = make_plan(HandNormalized(), (torch.randn(3, 8),))
    assert (p["w"].role, p["w"].axes) == ("neuron", (0,))
    assert p["g"].role == "gain"  # a different parameter broadcast onto w still is a gain
    assert not any(w.startswith("w:") for w in p.warnings), p.warnings


def test_dict_example_inputs_bind_through_compile_and_data_parallel_wrappers():
    ids = torch.randint(0, 20, (2, 5))
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}
    from nerofy.plan import positional_inputs

    want = (ids, None, batch["token_type_ids"])
    for wrapped in (nn.DataParallel(KeywordForward()), torch.compile(KeywordForward())):
        got = positional_inputs(wrapped, batch)
        assert len(got) == 3 and got[0] is ids and got[1] is None and got[2] is want[2]


def _config_default(name):
    """A decorator like transformers' merge_with_config_defaults: it takes (*args, **kwargs) and
    fills ``name`` from the module as a keyword where the call did not give it one."""
    import functools

    def deco(forward):
        @functools.wraps(forward)
        def wrapper(self, *args, **kwargs):
            if kwargs.get(name) is None:
                kwargs[name] = getattr(self, name)  # a positional value is not seen: it arrives twice
            return forward(self, *args, **kwargs)
        return wrapper
    return deco


class DecoratedForward(KeywordForward):
    feature_layer = 1

    @_config_default("feature_layer")
    def forward(self, input_ids, attention_mask=None, feature_layer=None, token_type_ids=None):
        return super().forward(input_ids, attention_mask, token_type_ids) * feature_layer


def test_dict_example_inputs_to_a_decorated_forward_keep_keys_after_a_gap_as_keywords():
    # mistral3: a default bound positionally between given keys (feature_layer=None) went to the
    # decorator as a positional value while it injected the keyword too: "got multiple values"
    from nerofy.trace import CallInputs

    ids = torch.randint(0, 20, (2, 5))
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}
    got = positional_inputs(DecoratedForward(), batch)
    assert isinstance(got, CallInputs) and got.args == (ids,) and list(got.kwargs) == ["token_type_ids"]
    p = make_plan(DecoratedForward(), batch)
    assert (p["seg.weight"].role, p["seg.weight"].frontend) == ("embedding", p.frontend)
    # keys that lead forward's parameters with no gap stay one positional tuple (fx can trace it)
    lead = {"input_ids": ids, "attention_mask": torch.ones(2, 5)}
    assert positional_inputs(DecoratedForward(), lead) == (ids, lead["attention_mask"])
    # an undecorated forward binds the same dict positionally, as before
    assert positional_inputs(KeywordForward(), batch) == (ids, None, batch["token_type_ids"])
    with pytest.raises(ValueError, match="lacks 'input_ids'"):
        positional_inputs(DecoratedForward(), {"token_type_ids": ids})
