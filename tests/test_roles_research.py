"""Roles on research code (issue 14): classes of use the analysis got wrong, each on a small model.

1. rows picked by a data index, then used as data, are embedding rows, and what is added to them
   is additive, whatever consumes the sum;
2. a product of parameters used as a weight is a weight: its consumer decides each factor's axes;
3. fan-in 2 with centring has no freedom: normalised without centring, with a plan note;
4. a parameter consumed only by an op without a rule is free *with a warning*;
5. parameters used through torch.func transforms (vmap) are followed, not reported "not used";
6. uses under the forward's own no_grad, and metadata queries, are not uses.
Every case runs under both frontends that trace Python code (fx and the recorder).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nerofy

FRONTENDS = [("fx", "modules"), ("record", "modules")]


def _plan(model, x, frontends):
    return nerofy.plan(model, example_inputs=(x,), frontends=frontends)


# ---- 1. data-picked rows used as data ------------------------------------------------------------
class RawGPT(nn.Module):
    """``(E[idx] + P) @ W`` as nanoGPT-style code without nn.Embedding/nn.Linear writes it."""

    def __init__(self, vocab=20, ctx=6, d=8, out=5):
        super().__init__()
        self.E = nn.Parameter(torch.randn(vocab, d))
        self.P = nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.W = nn.Parameter(torch.randn(d, out) / d ** 0.5)

    def forward(self, idx):
        return (self.E[idx] + self.P) @ self.W


class RawLinear(RawGPT):
    def forward(self, idx):
        return F.linear(self.E[idx], self.W.T)


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_rows_picked_by_data_then_used_as_data_are_embedding_rows(frontends):
    p = _plan(RawGPT(), torch.randint(0, 20, (2, 6)), frontends)
    assert (p["E"].role, p["E"].axes, p["E"].balanced) == ("embedding", (0,), True)
    assert (p["P"].role, p["P"].axes, p["P"].balanced) == ("additive", (0,), True)  # one vector per position
    assert (p["W"].role, p["W"].axes) == ("neuron", (1,))  # x @ W: neurons are W's columns
    assert not p.warnings
    q = _plan(RawLinear(), torch.randint(0, 20, (2, 6)), frontends)
    assert (q["E"].role, q["E"].axes) == ("embedding", (0,))
    assert (q["W"].role, q["W"].axes) == ("neuron", (1,))


def test_rows_picked_by_data_and_used_as_a_weight_stay_a_weight():
    class Routed(nn.Module):  # per-example expert weights: W[e] is the weight of a batched matmul
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(4, 8, 3))

        def forward(self, x, e):
            return torch.bmm(x.unsqueeze(1), self.W[e]).squeeze(1)

    p = nerofy.plan(Routed(), example_inputs=(torch.randn(5, 8), torch.randint(0, 4, (5,))),
                    frontends=("record", "modules"))
    assert (p["W"].role, p["W"].axes) == ("neuron", (0, 2))  # each expert's columns


# ---- 2. a product of parameters used as a weight -------------------------------------------------
class MergedLoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 8) / 8 ** 0.5)
        self.B = nn.Parameter(torch.randn(6, 3) * 0.1)
        self.A = nn.Parameter(torch.randn(3, 8) / 8 ** 0.5)

    def forward(self, x):
        return F.linear(x, self.W + self.B @ self.A)


class RightFactors(nn.Module):
    """``x @ (U @ V)``: U (in, r) then V (r, out); each factor's neurons are its columns."""

    def __init__(self):
        super().__init__()
        self.U = nn.Parameter(torch.randn(8, 3) / 8 ** 0.5)
        self.V = nn.Parameter(torch.randn(3, 5) / 3 ** 0.5)

    def forward(self, x):
        return x @ (self.U @ self.V)


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_a_product_of_parameters_used_as_a_weight_places_each_factor(frontends):
    p = _plan(MergedLoRA(), torch.randn(4, 8), frontends)
    # F.linear(x, B @ A) = x @ A.T @ B.T: A's rows and B's rows are neurons, like two nn.Linear
    assert [(p[n].role, p[n].axes) for n in "WBA"] == [("neuron", (0,))] * 3
    assert p["B"].fan_in == 3 and p["A"].fan_in == 8
    q = _plan(RightFactors(), torch.randn(4, 8), frontends)
    assert (q["U"].role, q["U"].axes, q["U"].fan_in) == ("neuron", (1,), 8)
    assert (q["V"].role, q["V"].axes, q["V"].fan_in) == ("neuron", (1,), 3)


def test_a_wrapped_merged_weight_trains_with_each_factor_balanced():
    torch.manual_seed(0)
    m, opt = nerofy.wrap(MergedLoRA(), example_inputs=(torch.randn(4, 8),))
    x, y = torch.randn(16, 8), torch.randn(16, 6)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        opt.step()
    for name in "WBA":
        v = m.parametrizations[name].original
        assert torch.allclose(v.norm(dim=1), torch.ones(v.shape[0]), atol=1e-5), name
        assert v.sum(1).abs().max() < 1e-5, name


# ---- 3. fan-in 2 ---------------------------------------------------------------------------------
class Coords(nn.Module):
    """A coordinate MLP: its first layer has fan-in 2."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_fan_in_2_is_normalised_without_centring_with_a_note(frontends):
    p = _plan(Coords(), torch.randn(4, 2), frontends)
    e = p["inp.weight"]
    assert e.role == "neuron" and e.fan_in == 2 and e.center is False and "fan-in 2" in e.reason
    assert any("fan-in 2" in w and "inp.weight" in w for w in p.warnings)
    assert p["out.weight"].center is True  # fan-in 16 keeps the paper's centring


def test_a_fan_in_2_layer_learns_after_wrapping():
    torch.manual_seed(0)
    m, opt = nerofy.wrap(Coords(), example_inputs=(torch.randn(4, 2),))
    v = m.inp.parametrizations.weight.original
    before = v.detach().clone()
    # centred, each row would be +-(1, -1)/sqrt(2): two directions only, rank 1
    assert torch.linalg.matrix_rank(m.inp.weight.detach()) == 2
    x = torch.randn(64, 2)
    y = (x[:, :1] * 2).sin()
    for _ in range(20):
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        opt.step()
    assert torch.allclose(v.norm(dim=1), torch.ones(16), atol=1e-5)
    assert (v - before).abs().max() > 1e-2  # the rows turned


# ---- 4. free without a rule: a warning -----------------------------------------------------------
class MatrixExp(nn.Module):
    def __init__(self):
        super().__init__()
        self.S = nn.Parameter(torch.randn(4, 4) * 0.1)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x @ torch.linalg.matrix_exp(self.S - self.S.T))


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_a_parameter_only_an_op_without_a_rule_consumes_is_free_with_a_warning(frontends):
    p = _plan(MatrixExp(), torch.randn(3, 4), frontends)
    assert p["S"].role == "free" and "matrix_exp" in p["S"].reason
    assert any(w.startswith("S:") and "left unconstrained (free)" in w and "plan.override" in w for w in p.warnings)
    # a role the user chose is not warned about
    p.override("S", role="free")
    assert not any(w.startswith("S:") for w in p["S"].warnings)


def test_an_orthogonal_parametrization_is_left_free_with_a_warning():
    m = nn.Sequential(nn.utils.parametrizations.orthogonal(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    p = nerofy.plan(m, example_inputs=(torch.randn(3, 4),))
    name = "0.parametrizations.weight.original"
    assert p[name].role == "free"
    assert any(w.startswith(name) and "free" in w for w in p.warnings)


# ---- 5. torch.func transforms --------------------------------------------------------------------
class Ensemble(nn.Module):
    """Three MLPs stacked and run with vmap(functional_call(...)), as torch.func's ensembling recipe."""

    def __init__(self, unused=False):
        super().__init__()
        members = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3)]
        params, _ = torch.func.stack_module_state(members)
        self.names = list(params)
        self.stacked = nn.ParameterList([nn.Parameter(params[n]) for n in self.names])
        self.skeleton = [copy.deepcopy(members[0]).to("meta")]  # a list: not a submodule, no parameters
        if unused:
            self.spare = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        def one(ps, x):
            return torch.func.functional_call(self.skeleton[0], dict(zip(self.names, ps)), (x,))
        return torch.vmap(one, in_dims=(0, None))(tuple(self.stacked), x)


def test_parameters_used_through_vmap_are_followed():
    p = nerofy.plan(Ensemble(), example_inputs=(torch.randn(5, 4),), frontends=("record", "modules"))
    # stacked (member, out, in) weights: one neuron per (member, row)
    assert (p["stacked.0"].role, p["stacked.0"].axes, p["stacked.0"].fan_in) == ("neuron", (0, 1), 4)
    assert (p["stacked.2"].role, p["stacked.2"].axes, p["stacked.2"].fan_in) == ("neuron", (0, 1), 8)
    assert p["stacked.1"].role == "bias"
    assert not any("not used" in w for w in p.warnings)


def test_a_parameter_the_trace_does_not_reach_in_a_transformed_forward_is_not_called_unused():
    p = nerofy.plan(Ensemble(unused=True), example_inputs=(torch.randn(5, 4),), frontends=("record", "modules"))
    e = p["spare"]
    assert e.role == "free" and "torch.func transform" in e.reason and "not used" not in e.reason
    assert any("torch.func transform" in w and "spare" in w for w in p.warnings)


# ---- 6. no_grad uses and metadata queries --------------------------------------------------------
@pytest.mark.parametrize("frontends", FRONTENDS)
@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_spectral_norm_power_iteration_is_not_a_use(frontends, style):
    sn = nn.utils.parametrizations.spectral_norm if style == "parametrization" else nn.utils.spectral_norm
    torch.manual_seed(0)
    m = nn.Sequential(sn(nn.Linear(8, 6)), nn.ReLU(), nn.Linear(6, 2))
    p = _plan(m, torch.randn(3, 8), frontends)
    name = "0.parametrizations.weight.original" if style == "parametrization" else "0.weight_orig"
    # the power iteration (under no_grad) multiplies W.T by u: it would make the columns neurons
    assert (p[name].role, p[name].axes) == ("neuron", (0,))
    assert not p.warnings


class Checkpointed(nn.Module):
    """A block run by a reentrant checkpoint: its forward runs under no_grad, and is still the use."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(lambda t: torch.relu(self.fc1(t)), x, use_reentrant=True)
        return self.fc2(h)


def test_uses_that_are_all_under_no_grad_still_count():
    x = torch.randn(3, 8, requires_grad=True)
    p = nerofy.plan(Checkpointed(), example_inputs=(x,), frontends=("record", "modules"))
    assert (p["fc1.weight"].role, p["fc1.weight"].axes, p["fc1.weight"].frontend) == ("neuron", (0,), "record")
    assert "not reached" not in p["fc1.weight"].reason and "not used" not in p["fc1.weight"].reason
    assert p["fc2.weight"].signal_gain() == pytest.approx(2 ** 0.5)


def test_metadata_queries_are_not_uses():
    class LearnedQuery(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Parameter(torch.randn(1, 3, 8))
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(self.q.expand(x.shape[0], -1, -1), x, x)[0]

    p = nerofy.plan(LearnedQuery(), example_inputs=(torch.randn(2, 5, 8),), frontends=("record", "modules"))
    assert not any("is_nested" in w for w in p.warnings), p.warnings


def _rel_bias(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return table[idx].permute(2, 0, 1)


torch.fx.wrap("_rel_bias")  # fx keeps it one call; nerofy looks inside with the recorder


class WrappedFunction(nn.Module):
    def __init__(self, length=4, heads=2):
        super().__init__()
        self.qk = nn.Linear(8, 16)
        self.table = nn.Parameter(torch.randn(2 * length - 1, heads) * 0.02)
        self.register_buffer("idx", torch.arange(length)[:, None] - torch.arange(length)[None, :] + length - 1)

    def forward(self, x):
        q, k = self.qk(x).view(x.shape[0], x.shape[1], 2, 8).unbind(2)
        logits = q.unsqueeze(1) @ k.unsqueeze(1).transpose(-1, -2)
        return logits + _rel_bias(self.table, self.idx)


def test_a_function_fx_leaves_opaque_is_still_read_with_grad_on():
    """The recorder that looks inside an fx-wrapped call runs with grad on (it skips only the
    function's own no_grad blocks): the table it uses is reached, as a logit bias."""
    p = nerofy.plan(WrappedFunction(), example_inputs=(torch.randn(2, 4, 8),), frontends=("fx", "modules"))
    assert p.frontend == "fx"
    e = p["table"]
    assert e.frontend and "not used" not in e.reason and e.role in ("embedding", "additive"), e.reason
    assert not e.balanced  # rows added to attention logits are logit biases


# ---- 1b. constant-index gathers contracted with queries (decided: balanced per row) --------------
class DecomposedRelPos(nn.Module):
    def __init__(self, length=5, d=8, zero=False):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.rel = nn.Parameter(torch.zeros(2 * length - 1, d) if zero else torch.randn(2 * length - 1, d) * 0.02)
        idx = torch.arange(length)[:, None] - torch.arange(length)[None, :] + (length - 1)
        self.register_buffer("idx", idx)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        logits = q @ k.transpose(-1, -2) + torch.einsum("bqd,qkd->bqk", q, self.rel[self.idx])
        return logits.softmax(-1) @ v


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_a_constant_index_table_contracted_with_queries_is_balanced_per_row(frontends):
    p = _plan(DecomposedRelPos(), torch.randn(2, 5, 8), frontends)
    assert (p["rel"].role, p["rel"].axes, p["rel"].fan_in) == ("neuron", (0,), 8)


def test_a_zero_initialised_relative_table_gets_directions_and_says_so(caplog):
    import logging

    m = DecomposedRelPos(zero=True)
    with caplog.at_level(logging.INFO, logger="nerofy"):
        m, _ = nerofy.wrap(m, example_inputs=(torch.randn(2, 5, 8),))
    assert any("no direction" in r.getMessage() for r in caplog.records)
    rows = m.parametrizations.rel.original
    assert torch.allclose(rows.norm(dim=1), torch.ones(rows.shape[0]), atol=1e-5)


# ---- 7. elementwise product, then a sum over the parameter's dims: a dot product ----------------
class AttentionVectors(nn.Module):
    """GAT-style scoring: ``(h * a).sum(-1)`` per head, and an additive-attention scorer ``v``."""

    def __init__(self, heads=2, d=8):
        super().__init__()
        self.lin = nn.Linear(6, heads * d)
        self.a = nn.Parameter(torch.randn(1, heads, d) * 0.1)
        self.v = nn.Parameter(torch.randn(d) * 0.1)
        self.heads, self.d = heads, d

    def forward(self, x):
        h = self.lin(x).view(-1, self.heads, self.d)
        score = (h * self.a).sum(dim=-1)  # (n, heads)
        pooled = (torch.tanh(h) * self.v).sum(-1)  # (n, heads)
        return score.softmax(0) * pooled


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_a_product_then_a_sum_over_the_parameters_dims_is_a_contraction(frontends):
    p = _plan(AttentionVectors(), torch.randn(5, 6), frontends)
    assert (p["a"].role, p["a"].axes, p["a"].fan_in) == ("neuron", (0, 1), 8)  # one neuron per head
    assert (p["v"].role, p["v"].axes, p["v"].fan_in) == ("neuron", (), 8)  # one neuron: the scorer


def test_a_product_not_summed_over_the_parameters_dims_stays_a_gain():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(8))
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x * self.g).sum(-1)  # summed after a layer, not over g's dims directly

    p = nerofy.plan(Scale(), example_inputs=(torch.randn(4, 8),))
    assert p["g"].role == "gain"
    q = nerofy.plan(Scale(), example_inputs=(torch.randn(4, 8),))
    assert q["lin.weight"].role == "neuron"


# ---- 5b. a wrapped model under torch.func transforms -------------------------------------------
def test_per_sample_gradients_of_a_wrapped_model_through_vmap_and_grad():
    torch.manual_seed(0)
    model, _ = nerofy.wrap(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)),
                           example_inputs=(torch.randn(2, 4),))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):  # the same as one ordinary backward per sample
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-5, atol=1e-6, msg=k)


def test_a_wrapped_model_runs_under_vmap():
    torch.manual_seed(0)
    model, _ = nerofy.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
                           example_inputs=(torch.randn(2, 4),))
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(torch.vmap(model)(x), model(x))
