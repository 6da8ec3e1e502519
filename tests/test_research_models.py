"""A probe over research libraries (issue 14): diffusers, torch_geometric, x-transformers and
torchaudio models, each planned, its neuron axes verified against the model's own use of every
weight (replayed contractions), wrapped and trained two Nero steps (nerofy.check.check_model). A
sample runs by default; ``-m slow`` runs them all.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nerofy.check import check_model

pytestmark = pytest.mark.usefixtures("single_thread")

SLOW = pytest.mark.slow


# ---- torch_geometric ----------------------------------------------------------------------------
def _graph():
    g = torch.Generator().manual_seed(0)
    src = torch.arange(10)
    ei = torch.stack([torch.cat([src, src]), torch.cat([(src + 1) % 10, (src + 3) % 10])])
    return torch.randn(10, 6, generator=g), ei


def _pyg(name):
    G = pytest.importorskip("torch_geometric.nn")
    convs = {
        "GCNConv": G.GCNConv, "SAGEConv": G.SAGEConv,
        "GATConv": lambda i, o: G.GATConv(i, o, heads=2, concat=False),
        "GATv2Conv": lambda i, o: G.GATv2Conv(i, o, heads=2, concat=False),
        "TransformerConv": lambda i, o: G.TransformerConv(i, o, heads=2, concat=False),
        "GINConv": lambda i, o: G.GINConv(nn.Sequential(nn.Linear(i, o), nn.ReLU(), nn.Linear(o, o))),
    }
    conv = convs[name]

    class TwoLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = conv(6, 16), conv(16, 4)

        def forward(self, x, edge_index):
            return self.c2(torch.relu(self.c1(x, edge_index)), edge_index)

    return TwoLayer(), _graph()


# ---- x-transformers -----------------------------------------------------------------------------
XT = {"rotary": dict(rotary_pos_emb=True), "alibi": dict(alibi_pos_bias=True, alibi_num_heads=2),
      "rel_pos_bias": dict(rel_pos_bias=True), "dynamic_pos_bias": dict(dynamic_pos_bias=True),
      "hyper_connections": dict(num_residual_streams=2), "ff_glu": dict(ff_glu=True), "memory_tokens": {}}


def _xt(name):
    xt = pytest.importorskip("x_transformers")
    kw = dict(XT[name])
    layers = (xt.Encoder if name == "memory_tokens" else xt.Decoder)(dim=16, depth=2, heads=2, **kw)
    model = xt.TransformerWrapper(num_tokens=50, max_seq_len=16, attn_layers=layers,
                                  num_memory_tokens=3 if name == "memory_tokens" else 0)
    return model, (torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0)),)


# ---- diffusers ----------------------------------------------------------------------------------
def _diffusers(name):
    D = pytest.importorskip("diffusers")
    t = torch.tensor([3, 7])
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    if name == "UNet2DModel":
        m = D.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                          norm_num_groups=8)
        return m, {"sample": r(2, 3, 8, 8), "timestep": t, "return_dict": False}
    if name == "UNet2DConditionModel":
        m = D.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                   block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                   norm_num_groups=8, attention_head_dim=4)
        return m, {"sample": r(2, 4, 8, 8), "timestep": t, "encoder_hidden_states": r(2, 5, 12), "return_dict": False}
    if name == "AutoencoderKL":
        m = D.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                            norm_num_groups=8, sample_size=16)
        return m, {"sample": r(2, 3, 16, 16), "return_dict": False}
    if name == "DiTTransformer2DModel":
        m = D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                    sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)
        return m, {"hidden_states": r(2, 4, 8, 8), "timestep": t, "class_labels": torch.tensor([1, 2]), "return_dict": False}
    if name == "SD3Transformer2DModel":
        m = D.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                    pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8)
        return m, {"hidden_states": r(2, 4, 8, 8), "encoder_hidden_states": r(2, 5, 12), "pooled_projections": r(2, 10),
                   "timestep": t, "return_dict": False}
    if name == "FluxTransformer2DModel":
        m = D.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                                     axes_dims_rope=(2, 2, 4))
        return m, {"hidden_states": r(2, 16, 4), "encoder_hidden_states": r(2, 5, 12), "pooled_projections": r(2, 10),
                   "timestep": torch.tensor([0.3, 0.7]), "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3),
                   "return_dict": False}
    raise KeyError(name)


# ---- torchaudio ---------------------------------------------------------------------------------
def _torchaudio(name):
    T = pytest.importorskip("torchaudio.models")
    g = torch.Generator().manual_seed(0)
    if name.startswith("wav2vec2"):
        pre = name == "wav2vec2-prenorm"
        m = T.wav2vec2_model("layer_norm" if pre else "group_norm", [(16, 10, 5), (16, 3, 2)], pre, 32, 0.0, 16, 4, 2,
                             2, 0.0, 64, 0.0, 0.0, pre, 0.0, 5 if pre else None)
        return m, (torch.randn(2, 400, generator=g),)
    if name == "Conformer":
        m = T.Conformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=3)
        return m, (torch.randn(2, 10, 16, generator=g), torch.tensor([10, 8]))
    if name == "Emformer":
        m = T.Emformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=2, segment_length=4, right_context_length=1)
        return m, (torch.randn(2, 9, 16, generator=g), torch.tensor([9, 7]))
    raise KeyError(name)


CASES = ([pytest.param(_pyg, n, marks=() if n in ("GCNConv", "GATConv") else SLOW, id=f"pyg-{n}")
          for n in ("GCNConv", "SAGEConv", "GATConv", "GATv2Conv", "TransformerConv", "GINConv")]
         + [pytest.param(_xt, n, marks=() if n == "alibi" else SLOW, id=f"x-transformers-{n}") for n in XT]
         + [pytest.param(_diffusers, n, marks=() if n == "DiTTransformer2DModel" else SLOW, id=f"diffusers-{n}")
            for n in ("UNet2DModel", "UNet2DConditionModel", "AutoencoderKL", "DiTTransformer2DModel",
                      "SD3Transformer2DModel", "FluxTransformer2DModel")]
         + [pytest.param(_torchaudio, n, marks=() if n == "Conformer" else SLOW, id=f"torchaudio-{n}")
            for n in ("wav2vec2", "wav2vec2-prenorm", "Conformer", "Emformer")])


@pytest.mark.parametrize("build, name", CASES)
def test_research_model_plans_verifies_and_trains(build, name):
    torch.manual_seed(0)
    model, inputs = build(name)
    r = check_model(model, inputs, plan_inputs=inputs, steps=2)
    assert r.status == "pass", r.error
    assert r.axes.get("fail", 0) == 0 and r.axes.get("ok", 0) > 0, r.axis_failures
    assert r.tensors_by_role.get("free", 0) == 0, r.warnings
    assert r.max_constraint_error < 1e-4
