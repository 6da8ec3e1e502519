"""nerofy.hf: any transformers config type built from its own default config, shrunk generically, with
example inputs synthesised from the model (``nerofy.example_inputs``), and the CLI's
``transformers:TYPE`` through it. The 83 hand-written specs the zoo used to carry are test cases of
the generic path here (their tasks; the full check of each is marked slow)."""
from __future__ import annotations


import math

import pytest
import torch

import nerofy

transformers = pytest.importorskip("transformers")
from nerofy import hf  # noqa: E402

# what the hand-written specs said each of them is (cli/sources.py before the generic path); two
# names were nerofy's own: deberta_v2 is transformers' "deberta-v2", clip_vision its "clip_vision_model"
OLD_SPECS = {
    "bert": "encoder", "roberta": "encoder", "distilbert": "encoder", "gpt2": "decoder", "llama": "decoder",
    "mixtral": "decoder", "t5": "encoder-decoder", "bart": "encoder-decoder", "vit": "vision", "wav2vec2": "speech",
    "whisper": "speech", "mistral": "decoder", "qwen2": "decoder", "qwen3": "decoder", "gemma": "decoder",
    "gemma2": "decoder", "phi": "decoder", "phi3": "decoder", "falcon": "decoder", "gpt_neox": "decoder",
    "gptj": "decoder", "opt": "decoder", "bloom": "decoder", "gpt_bigcode": "decoder", "mpt": "decoder",
    "stablelm": "decoder", "starcoder2": "decoder", "olmo2": "decoder", "cohere": "decoder", "granite": "decoder",
    "nemotron": "decoder", "persimmon": "decoder", "biogpt": "decoder", "mamba": "decoder", "rwkv": "decoder",
    "recurrent_gemma": "decoder", "qwen2_moe": "decoder", "qwen3_moe": "decoder", "granitemoe": "decoder",
    "jamba": "decoder", "gpt_oss": "decoder", "deepseek_v3": "decoder", "deberta-v2": "encoder",
    "electra": "encoder", "albert": "encoder", "mobilebert": "encoder", "swin": "vision", "convnext": "vision",
    "segformer": "vision", "dinov2": "vision", "beit": "vision", "clip_vision_model": "vision", "resnet": "vision",
    "mobilevit": "vision", "xlnet": "encoder", "reformer": "encoder", "longformer": "encoder",
    "big_bird": "encoder", "funnel": "encoder", "fnet": "encoder", "canine": "encoder", "squeezebert": "encoder",
    "mpnet": "encoder", "convbert": "encoder", "perceiver": "encoder", "ctrl": "decoder", "xglm": "decoder",
    "codegen": "decoder", "gpt_neo": "decoder", "mamba2": "decoder", "falcon_mamba": "decoder", "olmoe": "decoder",
    "phimoe": "decoder", "switch_transformers": "encoder-decoder", "pegasus": "encoder-decoder",
    "mt5": "encoder-decoder", "longt5": "encoder-decoder", "levit": "vision", "detr": "vision",
    "timesformer": "video", "hubert": "speech", "patchtst": "time-series", "clip": "multimodal",
}
SAMPLE = ["llama", "bert", "t5", "vit", "wav2vec2", "whisper", "clip", "mixtral"]


@pytest.fixture(autouse=True)
def _quiet(quiet_single_thread):
    yield


@pytest.fixture(scope="module")
def small():
    """type -> (shrunk model, info), built once for the module."""
    cache = {}

    def get(t):
        if t not in cache:
            torch.manual_seed(0)
            cache[t] = hf.build(t, "small")
        return cache[t]
    return get


def _meta_params(cls, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


@pytest.mark.parametrize("t", SAMPLE)
def test_shrunk_config_is_smaller_and_builds(t, small):
    cls, config = hf.model_class(t), hf.default_config(t)
    full = _meta_params(cls, config)
    model, info = small(t)
    n = sum(p.numel() for p in model.parameters())
    assert info["level"] in (0, 1, 2) and info["class"] == cls.__name__
    assert n < full / 20 and n < 3_000_000, (t, n, full)
    assert next(model.parameters()).device.type == "cpu"
    # only ever shrinks: every int the rules touch is at most the default's
    s, d = hf.shrink_config(config).to_dict(), config.to_dict()
    for k, v in s.items():
        if isinstance(v, int) and not isinstance(v, bool) and isinstance(d.get(k), int) and k != "vocab_size":
            assert v <= d[k], (t, k, v, d[k])


def test_shrink_rules_cap_depth_width_heads_experts_and_every_sub_config():
    llama = hf.shrink_config(hf.default_config("llama"))
    assert (llama.num_hidden_layers, llama.hidden_size, llama.num_attention_heads, llama.intermediate_size) == (2, 32, 2, 64)
    assert llama.num_key_value_heads == llama.num_attention_heads and llama.vocab_size == 256
    mixtral = hf.shrink_config(hf.default_config("mixtral"))
    assert mixtral.num_local_experts == 4 and mixtral.num_experts_per_tok == 2
    clip = hf.shrink_config(hf.default_config("clip"))
    for sub in (clip.text_config, clip.vision_config):
        assert sub.num_hidden_layers == 2 and sub.hidden_size == 32 and sub.num_attention_heads == 2
    assert clip.vision_config.image_size == 64 and clip.projection_dim == 32
    # level 0 leaves widths alone; a type's per-layer lists follow its new depth
    assert hf.shrink_config(hf.default_config("llama"), 0).hidden_size == 4096
    qwen3 = hf.shrink_config(hf.default_config("qwen3"))
    if getattr(qwen3, "layer_types", None) is not None:
        assert len(qwen3.layer_types) == qwen3.num_hidden_layers
    # special ids must still index the shrunk vocabulary
    assert clip.text_config.vocab_size > clip.text_config.eos_token_id


@pytest.mark.parametrize("t", SAMPLE)
def test_example_inputs_run_every_tower_and_plan_places_every_parameter(t, small):
    model, _ = small(t)
    model.train()
    inputs = nerofy.example_inputs(model)
    assert inputs and all(isinstance(v, torch.Tensor) for v in inputs.values())
    main = model.main_input_name
    assert main in inputs, (t, main, list(inputs))
    out = model(**inputs)
    from nerofy.check import default_loss

    loss = default_loss(out)
    assert torch.isfinite(loss), (t, loss)
    model.zero_grad()
    loss.backward()
    unused = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    # wav2vec2's masked_spec_embed is used only when time masking is on (mask_time_prob)
    assert unused <= {"masked_spec_embed"}, (t, sorted(unused)[:5])
    plan = nerofy.plan(model, inputs)
    names = {n for n, _ in model.named_parameters()}
    assert {e.name for e in plan} == names
    free = {e.name for e in plan if e.role == "free"}
    assert free <= unused, (t, sorted(free - unused)[:5])
    assert plan.summary()["constrained_share"] > 0.5


def test_multimodal_inputs_feed_both_towers(small):
    model, _ = small("clip")
    inputs = hf.example_inputs(model, batch=3, seq_len=7, seed=1)
    assert inputs["input_ids"].shape == (3, 7) and inputs["pixel_values"].shape == (3, 3, 64, 64)
    model.zero_grad()
    out = model(**inputs, return_loss=True)
    out.loss.backward()
    for tower in ("text_model", "vision_model"):
        got = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in getattr(model, tower).parameters()]
        assert got and all(got), tower
    # the same seed gives the same inputs; another seed others
    again = hf.example_inputs(model, batch=3, seq_len=7, seed=1)
    assert all(torch.equal(again[k], inputs[k]) for k in inputs)
    other = hf.example_inputs(model, batch=3, seq_len=7, seed=2)
    assert not torch.equal(other["pixel_values"], inputs["pixel_values"])


def test_encoder_decoder_and_speech_inputs_follow_the_config(small):
    t5, _ = small("t5")
    x = hf.example_inputs(t5)
    assert {"input_ids", "decoder_input_ids"} <= set(x)
    whisper, _ = small("whisper")
    x = hf.example_inputs(whisper)
    c = whisper.config
    assert x["input_features"].shape == (2, c.num_mel_bins, 2 * c.max_source_positions)
    assert "decoder_input_ids" in x
    vocab = t5.config.vocab_size
    ids = hf.example_inputs(t5)["input_ids"]
    specials = {t5.config.pad_token_id, t5.config.eos_token_id}
    assert int(ids.max()) < vocab and not any(bool((ids == s).any()) for s in specials)


def test_example_inputs_on_meta_at_the_default_size():
    """The structural zoo row: the full-size model on meta with meta inputs (real parameter counts)."""
    model, info = hf.build("bert", "default", device="meta")
    assert info["level"] is None
    assert sum(p.numel() for p in model.parameters()) == 109_482_240  # bert-base
    x = hf.example_inputs(model)
    # ids keep their values on the CPU (forwards compare them with placeholder ids); no all-ones mask
    assert x["input_ids"].device.type == "cpu" and "attention_mask" not in x
    with hf.meta_values():
        plan = nerofy.plan(model, x)
    assert plan.frontend == "record" and not [e for e in plan if e.role == "free"]


def test_example_inputs_refuses_other_models():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.example_inputs(torch.nn.Linear(2, 2))


def test_unknown_type_names_close_matches():
    with pytest.raises(KeyError, match="did you mean llama"):
        hf.model_class("lama")
    with pytest.raises(KeyError, match="clip_vision_model"):
        hf.build("clip_vison")
    with pytest.raises(ValueError, match="size must be"):
        hf.build("bert", "tiny")


def test_every_config_type_is_a_zoo_spec_and_the_old_specs_keep_their_task():
    from nerofy_cli import hf_source
    from nerofy_cli import sources as S

    types = hf.model_types()
    assert S.names("transformers") == types and len(types) > 500
    assert set(OLD_SPECS) <= set(types)
    wrong = {t: (hf_source.task_of(t), want) for t, want in OLD_SPECS.items() if hf_source.task_of(t) != want}
    # read from the library, two differ from the hand-written labels: xlnet has a causal-LM head and no
    # masked-LM one; perceiver's main input is a generic "inputs" tensor
    assert wrong == {"xlnet": ("decoder", "encoder"), "perceiver": ("other", "encoder")}, wrong
    # decoders get their causal-LM head; the rest their AutoModel class
    assert hf_source.head_for("gpt2") == "causal_lm" and hf.model_class("gpt2", "causal_lm").__name__ == "GPT2LMHeadModel"
    assert hf_source.head_for("bert") is None and hf_source.head_for("t5") is None and hf_source.head_for("clip") is None


def test_cli_plan_and_convert_a_transformers_type():
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from nerofy_cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["plan", "transformers:llama"])
    assert res.exit_code == 0, res.stderr
    assert "model.layers.0.mlp.gate_proj.weight" in res.stdout and "tracer: record" in res.stdout
    res = runner.invoke(app, ["plan", "transformers:lama"])
    assert res.exit_code == 1 and "transformers:llama" in res.stderr


# old specs the generic path does not yet run (rows in model_zoo_checks/check_transformers.jsonl);
# strict: a fix turns the xfail into a failure that says to drop it from here
GENERIC_FAILS = {
    "nemotron": "its default config leaves num_key_value_heads None: transformers itself cannot build it",
    "perceiver": "no input rule makes PerceiverModel's modality-specific `inputs`",
    "reformer": "axial position shapes (64, 64) need a sequence of 4096, the inputs have 16",
}


@pytest.mark.slow
@pytest.mark.parametrize("t", [pytest.param(t, marks=pytest.mark.xfail(reason=GENERIC_FAILS[t], strict=True))
                               if t in GENERIC_FAILS else t for t in sorted(OLD_SPECS)])
def test_old_spec_passes_the_full_check_through_the_generic_path(t):
    from nerofy_cli import sources as S

    row = S.check_job("transformers", t, steps=2)
    assert row["status"] == "pass", (t, row["status"], row["error"])
    assert row["axes"]["fail"] == 0


# ---------------------------------------------------------------------------------------------
# inputs from the forward's own layout parameters (issue 15's failure groups)
# ---------------------------------------------------------------------------------------------
def test_patch_inputs_follow_the_grid_and_the_patch_layout(small):
    """A vision tower that takes flattened patches beside their grid (``grid_thw``) gets them as
    ``hidden_states`` when that is what its forward calls them; the patch width is channels x
    temporal patch x patch^2, the temporal factor only where the config has one; NaFlex towers
    (``spatial_shapes``) get a padded patch sequence with its shapes and mask."""
    m, _ = small("qwen2_5_vl_vision")
    x = nerofy.example_inputs(m)
    v = m.config
    assert set(x) == {"hidden_states", "grid_thw"}
    assert x["hidden_states"].shape == (int(x["grid_thw"].prod(-1).sum()),
                                        v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
    with torch.no_grad():
        m(**x)
    m, _ = small("siglip2_vision_model")
    x = nerofy.example_inputs(m)
    n = int(x["spatial_shapes"][0].prod())
    assert x["pixel_values"].shape == (2, n, m.config.num_channels * m.config.patch_size ** 2)
    assert x["pixel_attention_mask"].shape == (2, n)
    with torch.no_grad():
        m(**x)
    with torch.device("meta"):
        cfg = hf.default_config("cosmos3_edge_vision")
        tower = hf.model_class("cosmos3_edge_vision")(cfg)
    assert not hasattr(cfg, "temporal_patch_size")
    assert nerofy.example_inputs(tower)["pixel_values"].shape[-1] == cfg.num_channels * cfg.patch_size ** 2


def test_audio_inputs_take_the_layout_the_forward_runs_on(small):
    """Raw audio as (batch, samples) or (batch, 1, samples), a spectrogram under input_values at
    the config's max_length x num_mel_bins, features bins-first where the encoder is Whisper's,
    and the frame mask its forward takes: the first layout one forward runs on, from no names."""
    m, _ = small("pe_audio_encoder")
    x = nerofy.example_inputs(m)
    assert x["input_values"].dim() == 3 and x["input_values"].shape[1] == 1
    assert nerofy.example_inputs(m, probe=False)["input_values"].dim() == 2  # what the config alone says
    m, _ = small("audio-spectrogram-transformer")
    x = nerofy.example_inputs(m)
    assert x["input_values"].shape == (2, m.config.max_length, m.config.num_mel_bins)
    m, _ = small("audioflamingo3_encoder")
    x = nerofy.example_inputs(m)
    assert x["input_features"].shape[1] == m.config.num_mel_bins
    assert x["input_features_mask"].shape == (2, x["input_features"].shape[2])
    for m in (small(t)[0] for t in ("pe_audio_encoder", "audio-spectrogram-transformer", "audioflamingo3_encoder")):
        with torch.no_grad():
            m(**nerofy.example_inputs(m))


def test_structural_row_plans_for_real_where_the_meta_forward_reads_values():
    """A forward that looks its experts up in a dict by a tensor's value cannot run on meta (a meta
    tensor has no value to hash): the row is planned from the shrunk model built for real and says
    so (``plan_from``, ``meta_error``, ``small_params``), with the full-size parameter count from meta."""
    from cli.hf_source import structural_job

    row = structural_job("switch_transformers")
    assert row["status"] == "pass", row["error"]
    assert row["plan_from"] == "small" and "KeyError" in row["meta_error"]
    with torch.device("meta"):
        full = hf.model_class("switch_transformers")(hf.default_config("switch_transformers"))
    assert row["total_params"] == sum(p.numel() for p in full.parameters()) > 100 * row["small_params"]
    assert sum(row["params_by_role"].values()) == row["small_params"]


def test_types_transformers_cannot_build_get_its_reason_with_the_line():
    from cli.hf_source import structural_job

    row = structural_job("lfm2_moe")  # its default config has layer_types=None, which its model indexes
    assert row["status"] == "fail_create"
    assert row["error"].startswith("transformers cannot build Lfm2MoeForCausalLM from its own default config")
    assert "modeling_lfm2_moe.py:" in row["error"]
    row = structural_job("slanet")  # a config with no model class: nerofy's reason, as it was
    assert row["status"] == "fail_create" and "config-only type" in row["error"]


def test_shrink_keeps_what_the_config_class_validates():
    """Config classes tie keys together: per-layer dicts keyed by layer index follow the new depth;
    multimodal RoPE sections are refitted to the shrunk head_dim (x partial_rotary_factor); where
    the class rejects the shrunk values (kv heads must equal heads), the rules' second choices
    (``Rule.alt``), else as many changes as it accepts."""
    small = hf.shrink_config(hf.default_config("gemma4"), 2)
    text = small.text_config.to_dict()
    assert text["num_hidden_layers"] == 2 and all(int(k) < 2 for k in text.get("per_layer_config") or {})
    assert hf.default_config("gemma4").text_config.to_dict()["per_layer_config"]  # it had some
    small = hf.shrink_config(hf.default_config("cosmos3_edge"), 2)
    t = small.text_config
    hd = t.head_dim or t.hidden_size // t.num_attention_heads
    assert sum(t.rope_parameters["mrope_section"]) == hd // 2
    cfg = hf.default_config("glm5_next_text")
    small = hf.shrink_config(cfg, 2)
    assert small.hidden_size < cfg.hidden_size and small.num_key_value_heads == small.num_attention_heads


def test_image_layouts_offer_several_images_per_sample_their_sizes_and_larger_sides():
    """One image or several per sample (idefics2 stacks them: (batch, images, C, H, W)); the
    images' own sizes where forward takes them (image_sizes); larger sides where a detector's
    queries need more tokens than a small image has."""
    with torch.device("meta"):
        det = hf.model_class("rt_detr")(hf.default_config("rt_detr"))
        vlm = hf.model_class("llava_next")(hf.default_config("llava_next"))
    layouts = hf.input_layouts(det)
    shapes = [tuple(x["pixel_values"].shape) for x in layouts]
    assert shapes[0] == (2, 3, 64, 64) and (2, 1, 3, 64, 64) in shapes and (2, 3, 640, 640) in shapes
    layouts = hf.input_layouts(vlm, device="cpu")
    assert "image_sizes" not in layouts[0]  # CLIP towers (llava) take none: only a layout offers them
    sized = [x for x in layouts if "image_sizes" in x]
    assert sized and all(x["image_sizes"].tolist() == [list(x["pixel_values"].shape[-2:])] * 2 for x in sized)


def test_required_inputs_no_rule_makes_come_from_the_forward_docstring():
    """``latents`` of shape ``(batch_size, hidden_size, frames)`` (a codec's decoder): each named
    dimension a batch, a sequence, the width or a config key; ``*_embeds`` (batch, seq, width)."""
    with torch.device("meta"):
        dec = hf.model_class("mimi_decoder")(hf.default_config("mimi_decoder"))
        asr = hf.model_class("nemotron3_5_transcribe_word_timestamp")(
            hf.default_config("nemotron3_5_transcribe_word_timestamp"))
    x = nerofy.example_inputs(dec, probe=False)
    assert tuple(x["latents"].shape) == (2, dec.config.hidden_size, hf.SEQ)
    x = nerofy.example_inputs(asr, probe=False)
    assert tuple(x["inputs_embeds"].shape) == (2, hf.SEQ, asr.config.hidden_size)


def test_a_model_without_forward_is_planned_by_module_rules_and_says_so():
    """A VQ tokenizer used through encode/decode has no forward to trace: its row is planned from
    module rules alone, and says so; a parameter no rule places would make it fail_trace."""
    from cli.hf_source import structural_job

    row = structural_job("chameleon_vqgan")
    assert row["status"] == "pass" and row["tracer"] == "modules"
    assert row["plan_from"] == "modules (no forward)"


def test_build_turns_the_kv_cache_off_for_a_training_forward():
    """Planning is for training, which builds no KV cache: ``build`` sets ``use_cache=False`` on the
    config and its sub-configs. A hybrid model whose cache would hold only linear-attention layers
    (bamba's first layer is mamba) then runs on meta instead of failing in ``get_seq_length``."""
    model, info = hf.build("bamba", "default", device="meta")
    assert model.config.use_cache is False
    vlm, _ = hf.build("llava", "default", device="meta")
    assert vlm.config.text_config.use_cache is False
    x = nerofy.example_inputs(model, probe=False)
    with hf.meta_values(), torch.no_grad():
        out = model(**x)
    assert tuple(out.last_hidden_state.shape) == (2, hf.SEQ, model.config.hidden_size)


def test_audio_lengths_and_widths_follow_the_config_and_the_input_projection():
    """Raw samples are a whole number of the patching encoder's patches (prod(patch_sizes)); frames
    whole chunks of n_window * 2 (Qwen3-ASR); stacked frames (k x mel bins) are the width of the
    first linear layer that reads a multiple of the bins (low-frame-rate encoders: 7 x 80)."""
    with torch.device("meta"):
        spark = hf.model_class("muse_spark_audio")(hf.default_config("muse_spark_audio"))
        asr = hf.model_class("qwen3_asr_encoder")(hf.default_config("qwen3_asr_encoder"))
        lfr = hf.model_class("fun_asr_nano_encoder")(hf.default_config("fun_asr_nano_encoder"))
    n = nerofy.example_inputs(spark, probe=False)["input_values"].shape[-1]
    assert n % math.prod(spark.config.patch_sizes) == 0
    shapes = [tuple(x["input_features"].shape) for x in hf.input_layouts(asr)]
    assert (2, asr.config.num_mel_bins, 2 * asr.config.n_window) in shapes  # (batch, bins, frames)
    x = nerofy.example_inputs(lfr)
    assert x["input_features"].shape[-1] == lfr.config.num_mel_bins * lfr.config.num_stacked_frames
    with hf.meta_values(), torch.no_grad():
        out = lfr(**x)
    assert out.last_hidden_state.shape[:2] == x["input_features"].shape[:2]


def test_pooled_image_tokens_fit_the_shrunk_patch_grid():
    """Gemma3's projector pools the (image_size / patch_size)-square patch grid to
    mm_tokens_per_image tokens: the tokens per side must divide the grid's side, or the pooling
    kernel is 0 ('stride should not be zero'). The shrunk config's fit, and the model runs."""
    small = hf.shrink_config(hf.default_config("gemma3"), 2)
    grid = small.vision_config.image_size // small.vision_config.patch_size
    side = math.isqrt(small.mm_tokens_per_image)
    assert side * side == small.mm_tokens_per_image and grid % side == 0
    model, info = hf.build("gemma3", "small")
    assert info["level"] == 2 and model.config.mm_tokens_per_image == small.mm_tokens_per_image
    x = nerofy.example_inputs(model)
    assert (x["input_ids"] == model.config.image_token_id).sum() == 2 * small.mm_tokens_per_image


def test_images_take_the_size_a_strict_patch_embedding_insists_on():
    """A wrapped timm ViT (pe_video's vision: TimmWrapperConfig names only the architecture) asserts
    its own image size: with no image size in the config, the frames take that size."""
    with torch.device("meta"):
        model = hf.model_class("pe_video_encoder")(hf.default_config("pe_video_encoder"))
    x = nerofy.example_inputs(model, probe=False)
    size = next(m.img_size for m in model.modules() if getattr(m, "strict_img_size", False) is True)
    assert tuple(x["pixel_values_videos"].shape[-2:]) == tuple(size) == (336, 336)


def test_an_audio_towers_output_dim_shrinks_with_the_text_width():
    """An audio tower's ``output_dim`` is the width its features enter the text model at: capped like
    the other widths, so the shrunk tower's features fill the shrunk text model's placeholders."""
    small = hf.shrink_config(hf.default_config("qwen3_asr"), 2)
    assert small.audio_config.output_dim == small.get_text_config().hidden_size == 32


def test_flattened_patches_take_the_temporal_patch_whatever_its_key():
    # Qwen2-VL-style towers read C x T x P x P values per patch; some configs name T patch_temporal
    model, _ = hf.build("muse_spark_vision", "small")
    x = hf.example_inputs(model)
    v = model.config
    assert x["pixel_values"].shape[-1] == 3 * v.patch_temporal * v.patch_size ** 2
    with torch.no_grad():
        model(**x)


def test_stacked_frame_width_comes_from_the_projection_input_dim():
    # SeamlessM4T's speech encoder reads frames at feature_projection_input_dim (80 mel bins x
    # stride 2 = 160) and its config names no bin count: the frames must have that width
    small = hf.shrink_config(hf.default_config("seamless_m4t"), 2)
    model = hf.model_class("seamless_m4t", None)(small)
    ex = hf.example_inputs(model)
    width = model.speech_encoder.feature_projection.layer_norm.normalized_shape[0]
    assert ex["input_features"].shape[-1] == width == small.feature_projection_input_dim


def test_flat_patch_pixels_are_a_layout_tried_after_images():
    # Fuyu embeds 30x30x3 patches with a Linear and has no convolution: its pixels are patch
    # sequences; RADIO has the same Linear but patchifies images itself: it keeps images
    fuyu, _ = hf.build("fuyu")
    px = hf.example_inputs(fuyu)["pixel_values"]
    v = fuyu.config
    assert px.dim() == 3 and px.shape[-1] == v.num_channels * v.patch_size ** 2
    radio, _ = hf.build("radio")
    assert hf.example_inputs(radio)["pixel_values"].dim() == 4


def test_packed_patches_are_also_tried_as_patch_images_one_sequence_per_batch():
    # PaddleOCR-VL's tower unpacks (batch, patches, C, P, P) and its VLM passes (patches, C, P, P):
    # the packed (patches, C*P*P) rows are offered as both; the model's own mrope_section (read
    # with a default in the modelling code, not declared by its config) fits the shrunk head_dim
    small = hf.shrink_config(hf.default_config("paddleocr_vl"), 2)
    t = small.text_config
    assert sum(t.rope_parameters["mrope_section"]) == t.head_dim // 2
    tower = hf.model_class("paddleocr_vl_vision", None)(hf.shrink_config(hf.default_config("paddleocr_vl_vision"), 2))
    shapes = [tuple(x["pixel_values"].shape) for x in hf.input_layouts(tower)]
    n, width = shapes[0]
    p = tower.config.patch_size
    assert (n, 3, p, p) in shapes and (1, n, 3, p, p) in shapes and width == 3 * p * p
    for name in ("paddleocr_vl_vision", "paddleocr_vl"):
        model = hf.model_class(name, None)(hf.shrink_config(hf.default_config(name), 2)).eval()
        with torch.no_grad():
            model(**hf.example_inputs(model))


def test_a_wrapped_vlm_gets_its_placeholders_and_cross_attended_images_their_mask():
    # ColModernVBert's retrieval head wraps a whole VLM (``vlm``): the placeholder id and the
    # feature method are the inner model's. IDEFICS cross-attends to several images per sample:
    # (batch, images, C, H, W) with an image_attention_mask of (batch, tokens, images)
    col, _ = hf.build("colmodernvbert")
    x = hf.example_inputs(col)
    assert x["pixel_values"].dim() == 5 and (x["input_ids"] == col.vlm.config.image_token_id).sum() > 0
    idefics, _ = hf.build("idefics")
    x = hf.example_inputs(idefics)
    assert x["pixel_values"].dim() == 5
    assert tuple(x["image_attention_mask"].shape) == (*x["input_ids"].shape, x["pixel_values"].shape[1])


def test_feature_bins_the_config_does_not_state_are_tried_at_the_usual_counts():
    # Gemma4's audio config names no mel bin count; its conv subsampler and projection are built
    # for 128 bins: 80 (the first guess) fails and 128 (MEL_BINS) runs
    model = hf.model_class("gemma4_audio", None)(hf.shrink_config(hf.default_config("gemma4_audio"), 2)).eval()
    assert hf.input_layouts(model)[0]["input_features"].shape[-1] == hf.MEL_BINS[0]
    x = hf.example_inputs(model)
    assert x["input_features"].shape[-1] == 128
    with torch.no_grad():
        model(**x)


def test_a_codecs_features_beside_its_samples_take_their_width_and_frame_count():
    # XCodec2 reads stacked semantic features (a LayerNorm over 2 x 80 bins, then a projection)
    # beside raw samples, one feature frame per prod(downsampling_ratios) samples
    model = hf.model_class("xcodec2", None)(hf.shrink_config(hf.default_config("xcodec2"), 2))
    hop = math.prod(model.config.downsampling_ratios)
    shapes = [(tuple(x["input_values"].shape), tuple(x["input_features"].shape)) for x in hf.input_layouts(model)]
    assert any(f[-1] == 160 and f[1] == v[-1] // hop for v, f in shapes)


def test_pix2struct_patches_lead_with_their_row_and_column():
    model, _ = hf.build("pix2struct")
    x = hf.example_inputs(model)["flattened_patches"]
    assert x.shape[-1] == 2 + model.config.vision_config.patch_embed_hidden_size
    assert x[..., :2].min() >= 1 and torch.equal(x[..., :2], x[..., :2].round())
    with torch.no_grad():
        model(**hf.example_inputs(model))


def test_a_text_mask_the_model_applies_to_audio_frames_is_left_out():
    # SeamlessM4T encodes the speech when given both and applies attention_mask to its frames: the
    # all-ones text mask (which means what no mask means) is dropped in a later layout
    model = hf.model_class("seamless_m4t", None)(hf.shrink_config(hf.default_config("seamless_m4t"), 2)).eval()
    first, x = hf.input_layouts(model)[0], hf.example_inputs(model)
    assert "attention_mask" in first and "attention_mask" not in x and "input_features" in x
    with torch.no_grad():
        model(**x)


def test_variable_resolution_patches_come_as_one_row_with_their_grids():
    # MiniCPM-V's tower takes every image as one row of patches, (1, C, P, patches x P), and each
    # image's patch grid as target_sizes; its default config leaves image_token_id None (a
    # checkpoint sets it), so the shrunk config gets a free id and the text holds the tower's tokens
    small = hf.shrink_config(hf.default_config("minicpmv4_6"), 2)
    assert small.image_token_id is not None and small.image_token_id < small.text_config.vocab_size
    model = hf.model_class("minicpmv4_6", None)(small).eval()
    x = hf.example_inputs(model)
    px, sizes = x["pixel_values"], x["target_sizes"]
    p = small.vision_config.patch_size
    assert px.shape[:3] == (1, 3, p) and px.shape[3] == p * int(sizes.prod(-1).sum())
    assert (x["input_ids"] == small.image_token_id).sum() > 0
    with torch.no_grad():
        model(**x)


def test_any_resolution_images_come_with_their_tiles():
    # LLaVA-NeXT cuts each image into the base view plus a grid of tiles picked from
    # image_grid_pinpoints (whole tiles of the tower's image size, which shrinks with it)
    small = hf.shrink_config(hf.default_config("llava_next"), 2)
    side = small.vision_config.image_size
    assert all(h % side == 0 and w % side == 0 for h, w in small.image_grid_pinpoints)
    model = hf.model_class("llava_next", None)(small).eval()
    x = hf.example_inputs(model)
    assert x["pixel_values"].dim() == 5 and x["pixel_values"].shape[1] > 1
    assert x["image_sizes"].tolist() == [[side, side]] * x["pixel_values"].shape[0]
    with torch.no_grad():
        model(**x)


def test_towers_the_config_leaves_out_get_no_inputs():
    # Gemma 4's default config has vision_config = audio_config = None: the model has no vision or
    # audio tower, so no pixels or audio features are made (they would reach a None tower)
    model = hf.model_class("gemma4", None)(hf.shrink_config(hf.default_config("gemma4"), 2)).eval()
    assert model.config.vision_config is None and model.config.audio_config is None
    x = hf.example_inputs(model)
    assert set(x) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        model(**x)
    full = hf.model_class("llava", None)(hf.shrink_config(hf.default_config("llava"), 2))
    assert "pixel_values" in hf.example_inputs(full)


def test_tiled_images_region_features_language_ids_and_image_pairs():
    # Mllama: (batch, images, max_num_tiles, C, H, W) with aspect-ratio ids (1: one tile) and a tile
    # mask; LXMERT: detector regions and their boxes; X-MOD: a language adapter per sample;
    # LightGlue: two images per sample
    for name in ("mllama", "lxmert", "xmod", "lightglue"):
        model = hf.model_class(name, None)(hf.shrink_config(hf.default_config(name), 2)).eval()
        x = hf.example_inputs(model) if name != "lightglue" else hf.input_layouts(model)[2]
        with torch.no_grad():
            model(**x)
        if name == "mllama":
            tiles = model.config.vision_config.max_num_tiles
            assert x["pixel_values"].shape[1:3] == (1, tiles) and x["aspect_ratio_ids"].tolist() == [[1]] * 2
            assert x["aspect_ratio_mask"][..., 0].all() and not x["aspect_ratio_mask"][..., 1:].any()
        if name == "lxmert":
            assert x["visual_pos"].shape[-1] == model.config.visual_pos_dim
        if name == "lightglue":
            assert x["pixel_values"].shape[1] == 2


def test_inputs_from_docstrings_vocoder_spectrograms_and_lazy_layouts():
    # HiFi-GAN vocoders take (batch, frames, model_in_dim) mel frames; FLAVA's multimodal encoder
    # takes hidden states (batch, seq, hidden) whose documented length is a sum no config states
    for name in ("speecht5_hifigan", "flava_multimodal_model"):
        model = hf.model_class(name, None)(hf.shrink_config(hf.default_config(name), 2)).eval()
        x = hf.example_inputs(model)
        if name == "speecht5_hifigan":
            assert x["spectrogram"].shape[-1] == model.config.model_in_dim
        else:
            assert x["hidden_states"].shape[-1] == model.config.hidden_size
        with torch.no_grad():
            model(**x)
    # iter_layouts makes the same layouts as input_layouts, one at a time
    model = hf.model_class("whisper", None)(hf.shrink_config(hf.default_config("whisper"), 2))
    lazy = hf.iter_layouts(model)
    assert not isinstance(lazy, list)
    eager = hf.input_layouts(model)
    for a, b in zip(lazy, eager, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_meta_values_select_by_masks_and_run_cpu_tensors_on_meta():
    """Under ``meta_values`` a meta forward may select by a mask inside a kernel (boolean
    indexing, masked assignment: every element kept) and meet tensors it made on the CPU (the op
    runs on meta); outside it both fail as torch makes them fail."""
    x = torch.empty(4, 5, device="meta")
    m = torch.empty(4, 5, dtype=torch.bool, device="meta")
    with pytest.raises(NotImplementedError):
        x[m]
    with pytest.raises(RuntimeError, match="device"):
        x + torch.ones(5)
    with hf.meta_values():
        assert x[m].shape == (20,)
        x[m] = 1.0
        y = x + torch.arange(5.0)  # a CPU tensor the forward built
        assert y.device.type == "meta" and y.shape == (4, 5)
        with pytest.raises(RuntimeError, match="broadcast"):
            x + torch.ones(3)  # a wrong shape stays an error
    import torch.fx.experimental._config as fx_config
    assert not fx_config.meta_nonzero_assume_all_nonzero  # torch's switch is restored


def test_meta_inputs_keep_the_values_forwards_read():
    """On meta, integer inputs (an image grid, ids) stay on the CPU with their values, floats go to
    meta: a variable-resolution vision tower that splits its patches by ``grid.tolist()`` plans at
    its full size on meta."""
    model, _ = hf.build("qwen2_5_vl_vision", "default", device="meta")
    x = hf.example_inputs(model)
    assert x["grid_thw"].device.type == "cpu" and x["grid_thw"].dtype == torch.long
    assert x["hidden_states"].device.type == "meta"
    assert int(x["grid_thw"].prod(-1).sum()) == x["hidden_states"].shape[0]
    with hf.meta_values():
        plan = nerofy.plan(model, x)
    assert sum(e.numel() for e in plan) == sum(p.numel() for p in model.parameters()) > 500_000_000
