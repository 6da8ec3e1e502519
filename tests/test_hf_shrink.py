"""nerofy.hf_shrink: a shrunk config that stays over the parameter budget (its size in keys no
shrink rule names) is fitted under it from the model's own tensor sizes, keeping divisibility."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from nerofy import hf, hf_shrink  # noqa: E402

LIMIT = 30_000_000


def _shrunk(name, level=2):
    cls = hf.model_class(name)
    cfg = hf.default_config(name)
    hf.assign_placeholder_ids(cfg)
    return cls, hf.shrink_config(cfg, level)


def test_divided_keeps_divisors_and_floor():
    d = {"hidden": 768, "heads": 12, "groups": 64}
    # 768 / 8 = 96: 12 divides it, 64 does not -> / 4 = 192 (both divide)
    assert hf_shrink._divided(d, ("hidden",), 768, 8) == 192
    assert hf_shrink._divided({"x": 32}, ("x",), 32, 8) == 16  # FLOOR
    assert hf_shrink._divided({"x": 33}, ("x",), 33, 8) == 33  # odd: stays


@pytest.mark.parametrize("name,key", [("xlm", "emb_dim"), ("luke", "entity_vocab_size")])
def test_unnamed_size_keys_are_found_from_tensor_dims(name, key):
    cls, small = _shrunk(name)
    before = hf._count_meta(cls, small)
    assert before > LIMIT  # the rules alone leave it big
    log = []
    fitted, n = hf_shrink.fit_params(cls, small, LIMIT // 4, hf._count_meta, log)
    assert n == hf._count_meta(cls, fitted) <= LIMIT // 4
    assert any(p[-1] == key for p, _, _ in log), log
    assert getattr(fitted, key) < getattr(small, key)


def test_validator_tied_keys_are_repaired_together():
    # mamba2 validates hidden_size * expand == num_heads * head_dim: hidden alone is refused
    cls, small = _shrunk("mamba2")
    fitted, n = hf_shrink.fit_params(cls, small, LIMIT // 4, hf._count_meta)
    assert fitted.hidden_size < small.hidden_size
    assert fitted.hidden_size * fitted.expand == fitted.num_heads * fitted.head_dim
    assert n == hf._count_meta(cls, fitted) <= LIMIT


def test_build_fits_and_runs_forward():
    model, info = hf.build("xlm", "small")
    assert sum(p.numel() for p in model.parameters()) <= LIMIT
    assert info["config"].emb_dim % info["config"].n_heads == 0
    with torch.no_grad():
        model(**hf.example_inputs(model))


def test_under_budget_configs_are_left_alone():
    cls, small = _shrunk("bert")
    assert hf._count_meta(cls, small) <= LIMIT
    fitted, n = hf_shrink.fit_params(cls, small, LIMIT, hf._count_meta)
    assert fitted is small and n == hf._count_meta(cls, small)


def test_multi_head_attention_stays_multi_head():
    # latent attention (deepseek_v3: kv heads == heads by default) builds its keys per head: the
    # rules' grouped default (1 kv head for 2 heads) would not run; grouped configs stay grouped
    mla = hf.shrink_config(hf.default_config("deepseek_v3"), 2)
    assert mla.num_key_value_heads == mla.num_attention_heads == 2
    gqa = hf.shrink_config(hf.default_config("mixtral"), 2)
    assert gqa.num_key_value_heads < gqa.num_attention_heads


def test_widths_no_rule_names_follow_the_width_they_equal():
    # gemma2: query_pre_attn_scalar == head_dim (256) by default; codegen's rotary_dim must fit the head
    g = hf.shrink_config(hf.default_config("gemma2"), 2)
    assert g.query_pre_attn_scalar == g.head_dim == 16
    c = hf.shrink_config(hf.default_config("codegen"), 2)
    assert c.rotary_dim <= c.n_embd // c.n_head
    model, _ = hf.build("codegen", "small")
    with torch.no_grad():
        model(**hf.example_inputs(model))


def test_small_counts_are_not_coupled():
    # only widths couple: a value of 2 or 4 in one key says nothing about another key of 2
    d = {"hidden_size": 4096, "some_width": 4096, "num_hidden_layers": 32, "some_count": 32, "other": 100}
    small = hf._couple(d, {**d, "hidden_size": 32, "num_hidden_layers": 2})
    assert small["some_width"] == 32 and small["some_count"] == 32 and small["other"] == 100


def test_per_layer_lists_keep_every_kind_of_layer_aligned():
    # the first layer of each kind, then the earliest others, the same layers for every list
    lists = [["s", "s", "s", "f", "s", "f"], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]]
    assert hf._kept_layers(lists, 2) == [0, 3]
    assert hf._kept_layers(lists, 3) == [0, 1, 3]
    assert hf._kept_layers([[1, 2, 3]], 2) == [0, 1]  # numbers are not kinds: the first layers
    # a real config: gemma3n's 4 sliding + 1 full pattern, 15 of 35 layers sharing a cache
    small = hf.shrink_config(hf.default_config("gemma3n_text"), 2)
    assert small.num_hidden_layers == 2
    assert sorted(small.layer_types) == ["full_attention", "sliding_attention"]
    assert small.num_kv_shared_layers == 0  # a 2-layer model cannot hold the layers a shared cache needs
    assert len(small.activation_sparsity_pattern) == 2
    cls = hf.model_class("gemma3n_text")
    m = cls(small)
    out = m(**hf.example_inputs(m))
    assert torch.isfinite(out.last_hidden_state).all()


def test_each_shrunk_config_is_tried_once():
    # a text model has no image sizes or stage lists: levels 2 and 1 shrink it alike, and the
    # second is not built again (nor fitted to the budget again); the error says so
    with pytest.raises(ValueError) as e:
        hf.build("llama", max_small_params=1000)
    msg = str(e.value)
    assert "level 2: ValueError" in msg and "level 1: the config of level 2" in msg and "level 0: ValueError" in msg
    assert "first layers" not in msg  # over the budget: other layers of the same sizes are not tried


def test_backbones_keep_as_many_output_stages_as_their_neck_reads():
    # DPT-style heads read one feature map per neck entry: Depth Anything outputs stages 9-12 of 12.
    # The shrunk backbone keeps a layer per output stage, the same number of distinct outputs, and
    # a single-output backbone (DINOv2's last stage) shrinks to 2 layers with its last stage out
    small = hf.shrink_config(hf.default_config("depth_anything"), 2)
    b = small.backbone_config
    assert b.num_hidden_layers == 4 and b.out_indices == [1, 2, 3, 4]
    assert b.out_features == ["stage1", "stage2", "stage3", "stage4"] == b.stage_names[1:]
    assert len(b.out_indices) == len(small.neck_hidden_sizes)
    d = hf.shrink_config(hf.default_config("dinov2"), 2)
    assert d.num_hidden_layers == 2 and list(d.out_indices) == [2] and d.out_features == ["stage2"]
    assert hf._rescale_indices([6, 12, 18, 24], 24, 4, low=1) == [1, 2, 3, 4]
    assert hf._rescale_indices([9, 10, 11, 12], 12, 4, low=1) == [1, 2, 3, 4]


def test_hook_layer_ids_move_to_the_same_relative_depth_of_the_shrunk_encoder():
    # DepthPro fuses its patch encoder's layers 11 and 5 of 12: at 2 layers they are 1 and 0
    small = hf.shrink_config(hf.default_config("depth_pro"), 2)
    assert small.patch_model_config.num_hidden_layers == 2
    assert list(small.intermediate_hook_ids) == [1, 0]
    model = hf.model_class("depth_pro", None)(small).eval()
    with torch.no_grad():
        model(**hf.example_inputs(model))


def test_sam_keeps_its_prompt_grid_and_position_features_tied_to_the_shrunk_tower():
    # SAM's dense prompt covers image_size / patch_size cells, and its shared position embedding
    # makes 2 x num_pos_feats channels (the tower's output width): both follow the shrunk sizes
    small = hf.shrink_config(hf.default_config("sam"), 2)
    p, v = small.prompt_encoder_config, small.vision_config
    assert p.image_embedding_size == p.image_size // p.patch_size == 4
    assert 2 * v.num_pos_feats == v.output_channels and small.mask_decoder_config.mlp_dim <= 64
    model = hf.model_class("sam", None)(small).eval()
    with torch.no_grad():
        model(**hf.example_inputs(model))


def test_sam2_keeps_its_fpn_channels_and_feature_sizes_tied_to_the_hiera_tower():
    # SAM2's neck lists the Hiera tower's stage widths from the top (backbone_channel_list) and the
    # feature-map sizes per level (image / 4, / 8, / 16); Hiera pools only where a stage's width changes
    small = hf.shrink_config(hf.default_config("sam2_vision_model"), 2)
    widths = small.backbone_config.embed_dim_per_stage
    assert widths == sorted(set(widths)) and list(small.backbone_channel_list) == widths[::-1]
    side = small.backbone_config.image_size[0]
    assert small.backbone_feature_sizes == [[side // 4] * 2, [side // 8] * 2, [side // 16] * 2]
    model = hf.model_class("sam2_vision_model", None)(small).eval()
    with torch.no_grad():
        model(**hf.example_inputs(model))


def test_layer_lists_of_the_same_config_follow_its_depth():
    # Mllama's tower concatenates the features of intermediate layers 3, 7, 15, 23, 30 (of 32) with
    # its last: at 2 layers they index layers that exist and vision_output_dim stays hidden x 6;
    # its text model's cross-attention layers keep one layer of each kind
    small = hf.shrink_config(hf.default_config("mllama"), 2)
    v, t = small.vision_config, small.text_config
    assert all(0 <= i < v.num_hidden_layers for i in v.intermediate_layers_indices)
    assert v.vision_output_dim == v.hidden_size * (len(v.intermediate_layers_indices) + 1)
    assert t.num_hidden_layers == 2 and list(t.cross_attention_layers) == [1]
