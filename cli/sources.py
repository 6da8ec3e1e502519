"""Models beyond timm for ``nerofy zoo --source torchvision|transformers``: name -> factory, example
inputs and loss. Nothing is downloaded: torchvision models are built with ``weights=None`` (and
``weights_backbone=None``), Hugging Face models from small configs.

API (what ``nerofy zoo`` calls)::

    sources.SOURCES                         # ("torchvision", "transformers")
    sources.names(source)                   # every model name of that source, sorted
    spec = sources.get(source, name)        # a ModelSpec (KeyError with close matches if unknown)
    model = spec.create(meta=False)         # nn.Module, random init (meta=True: on the meta device)
    inputs = spec.inputs(batch=2, seed=0)   # a tuple: model(*inputs)
    loss = spec.loss(model(*inputs))        # a scalar to backpropagate
    row = sources.check_job(source, name, steps=3, verify=True, max_params=60e6)   # a zoo row

``check_job`` returns the same row fields as ``cli.jobs.check_job`` (``name`` is
``"<source>:<name>"``, ``family`` the task: classification / detection / segmentation / video /
optical_flow / quantizable / encoder / decoder / encoder-decoder / vision / speech), so the report and expected.json treat it like a timm row.
Nothing here prints.
"""
from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

SOURCES = ("torchvision", "transformers")


def _default_loss(out: Any) -> torch.Tensor:
    from nerofy.check import default_loss

    return default_loss(out)


def _sum_losses(out: Any) -> torch.Tensor:
    """torchvision detection models in train mode return a dict of losses."""
    if isinstance(out, dict) and out and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values()):
        return sum(out.values())
    return _default_loss(out)


@dataclass(frozen=True)
class ModelSpec:
    source: str
    name: str
    task: str
    factory: Callable[[], nn.Module] = field(repr=False)
    make_inputs: Callable[[int, torch.Generator], tuple] = field(repr=False)
    loss: Callable[[Any], torch.Tensor] = field(default=_default_loss, repr=False)

    @property
    def full_name(self) -> str:
        return f"{self.source}:{self.name}"

    def create(self, meta: bool = False) -> nn.Module:
        if meta:
            try:
                with torch.device("meta"):
                    return self.factory()
            except NotImplementedError:
                # a constructor that reads tensor values (torchvision's RegNet widths) cannot run on
                # meta: build it for real once, then drop the storage
                return self.factory().to("meta")
        return self.factory()

    def inputs(self, batch: int = 2, seed: int = 0) -> tuple:
        return self.make_inputs(batch, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------
_TV_IMAGE = 64
# classification models that need another input size or a constructor argument at small sizes
# maxvit: multiples of 7 * 32 only; inception_v3's train-mode aux head needs its 299 px
_TV_SIZE = {"inception_v3": 299, "vit_h_14": 56, "maxvit_t": 224}
_TV_KW = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 64},
          "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 56},
          "inception_v3": {"init_weights": True}, "googlenet": {"init_weights": True}}
_DET_SIZE = 128
# video clips (frames, px): MViT's position embeddings want its 16 x 224 clips; S3D's last pooling a
# 7 x 7 map (224 px)
_VIDEO_SIZE = {"mvi": (16, 224), "s3d": (16, 224)}
_FLOW_SIZE = 128  # RAFT's correlation pyramid needs feature maps of at least 16 px (128 / 8)


def _tv():
    import torchvision

    return torchvision


def _images(c: int, s: int):
    return lambda b, g: (torch.randn(b, c, s, s, generator=g),)


def _clips(t: int, s: int):
    return lambda b, g: (torch.randn(b, 3, t, s, s, generator=g),)


def _frame_pairs(s: int):
    return lambda b, g: (torch.randn(b, 3, s, s, generator=g), torch.randn(b, 3, s, s, generator=g))


def _det_inputs(name: str):
    def make(b, g):
        imgs, targets = [], []
        for _ in range(b):
            imgs.append(torch.rand(3, _DET_SIZE, _DET_SIZE, generator=g))
            xy = torch.rand(2, 2, generator=g) * (_DET_SIZE / 2)
            boxes = torch.cat([xy, xy + 16 + torch.rand(2, 2, generator=g) * (_DET_SIZE / 2 - 16)], 1)
            # keypoint R-CNN has 2 classes (background, person): labels must stay below 2
            hi = 2 if name.startswith("keypointrcnn") else 3
            t = {"boxes": boxes, "labels": torch.randint(1, hi, (2,), generator=g)}
            if name.startswith("maskrcnn"):
                t["masks"] = torch.zeros(2, _DET_SIZE, _DET_SIZE, dtype=torch.uint8)
                for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                    t["masks"][i, y0:y1, x0:x1] = 1
            if name.startswith("keypointrcnn"):
                kp = boxes[:, None, :2] + torch.rand(2, 17, 2, generator=g) * 16
                t["keypoints"] = torch.cat([kp, torch.ones(2, 17, 1)], 2)
            targets.append(t)
        return imgs, targets
    return make


def _tv_specs() -> dict[str, ModelSpec]:
    tv = _tv()
    M = tv.models
    out: dict[str, ModelSpec] = {}
    for name in M.list_models(module=M):
        kw = dict(_TV_KW.get(name, {}))
        out[name] = ModelSpec("torchvision", name, "classification",
                              lambda n=name, kw=kw: M.get_model(n, weights=None, num_classes=10, **kw),
                              _images(3, _TV_SIZE.get(name, _TV_IMAGE)))
    for name in M.list_models(module=M.detection):
        kw: dict = {"weights": None, "weights_backbone": None, "num_classes": 3}
        if not name.startswith("ssd"):
            kw.update(min_size=_DET_SIZE, max_size=_DET_SIZE)
        if name.startswith("keypointrcnn"):
            kw["num_classes"] = 2
        out[name] = ModelSpec("torchvision", name, "detection", lambda n=name, kw=kw: M.get_model(n, **kw),
                              _det_inputs(name), _sum_losses)
    for name in M.list_models(module=M.segmentation):
        out[name] = ModelSpec("torchvision", name, "segmentation",
                              lambda n=name: M.get_model(n, weights=None, weights_backbone=None, num_classes=3),
                              _images(3, _TV_IMAGE))
    for name in M.list_models(module=M.video):
        out[name] = ModelSpec("torchvision", name, "video", lambda n=name: M.get_model(n, weights=None, num_classes=5),
                              _clips(*_VIDEO_SIZE.get(name[:3], (8, _TV_IMAGE))))
    for name in M.list_models(module=M.optical_flow):
        out[name] = ModelSpec("torchvision", name, "optical_flow", lambda n=name: M.get_model(n, weights=None),
                              _frame_pairs(_FLOW_SIZE))
    for name in M.list_models(module=M.quantization):
        # the float, quantization-ready variant (QuantStub, FloatFunctional): what quantization-aware
        # training trains
        kw = dict(_TV_KW.get(name.removeprefix("quantized_"), {}))
        out[name] = ModelSpec("torchvision", name, "quantizable",
                              lambda n=name, kw=kw: M.get_model(n, weights=None, quantize=False, num_classes=10, **kw),
                              _images(3, _TV_SIZE.get(name.removeprefix("quantized_"), _TV_IMAGE)))
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers (small configs, nothing downloaded)
# ---------------------------------------------------------------------------------------------
_VOCAB, _SEQ, _H = 128, 12, 32
_TXT = dict(vocab_size=_VOCAB, hidden_size=_H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


def _ids(b, g, n=_SEQ):
    return torch.randint(1, _VOCAB, (b, n), generator=g)


def _hf_specs() -> dict[str, ModelSpec]:
    def mk(cls_name: str, cfg_name: str, **cfg):
        def f():
            import transformers

            config = getattr(transformers, cfg_name)(**cfg)
            return getattr(transformers, cls_name)(config)
        return f

    no_cache = dict(use_cache=False)
    specs = [
        # encoders
        ("bert", "encoder", mk("BertModel", "BertConfig", **_TXT),
         lambda b, g: (_ids(b, g), torch.ones(b, _SEQ, dtype=torch.long))),
        ("roberta", "encoder", mk("RobertaModel", "RobertaConfig", **dict(_TXT, pad_token_id=0)),
         lambda b, g: (_ids(b, g), torch.ones(b, _SEQ, dtype=torch.long))),
        ("distilbert", "encoder", mk("DistilBertModel", "DistilBertConfig", vocab_size=_VOCAB, dim=_H, n_layers=2,
                                     n_heads=2, hidden_dim=64, max_position_embeddings=64),
         lambda b, g: (_ids(b, g), torch.ones(b, _SEQ, dtype=torch.long))),
        # decoders
        ("gpt2", "decoder", mk("GPT2LMHeadModel", "GPT2Config", vocab_size=_VOCAB, n_embd=_H, n_layer=2, n_head=2,
                               n_positions=64, **no_cache), lambda b, g: (_ids(b, g),)),
        ("llama", "decoder", mk("LlamaForCausalLM", "LlamaConfig", **dict(_TXT, num_key_value_heads=1, **no_cache)),
         lambda b, g: (_ids(b, g),)),
        # mixture of experts: experts stored (E, out, in), run by a grouped matmul
        ("mixtral", "decoder", mk("MixtralForCausalLM", "MixtralConfig",
                                  **dict(_TXT, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                                         **no_cache)),
         lambda b, g: (_ids(b, g),)),
        # encoder-decoders: (input_ids, attention_mask, decoder_input_ids)
        ("t5", "encoder-decoder", mk("T5ForConditionalGeneration", "T5Config", vocab_size=_VOCAB, d_model=_H, d_kv=16,
                                     d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, decoder_start_token_id=0,
                                     **no_cache),
         lambda b, g: (_ids(b, g), torch.ones(b, _SEQ, dtype=torch.long), _ids(b, g, 6))),
        ("bart", "encoder-decoder", mk("BartForConditionalGeneration", "BartConfig", vocab_size=_VOCAB, d_model=_H,
                                       encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                       max_position_embeddings=64, **no_cache),
         lambda b, g: (_ids(b, g), torch.ones(b, _SEQ, dtype=torch.long), _ids(b, g, 6))),
        # vision transformer
        ("vit", "vision", mk("ViTForImageClassification", "ViTConfig", hidden_size=_H, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=10),
         lambda b, g: (torch.randn(b, 3, 32, 32, generator=g),)),
        # speech
        ("wav2vec2", "speech", mk("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=_H, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                  conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                  do_stable_layer_norm=True, mask_time_prob=0.0),
         lambda b, g: (torch.randn(b, 1600, generator=g),)),
        ("whisper", "speech", mk("WhisperModel", "WhisperConfig", vocab_size=_VOCAB, num_mel_bins=16, d_model=_H,
                                 encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 max_source_positions=32, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2, decoder_start_token_id=1, **no_cache),
         lambda b, g: (torch.randn(b, 16, 64, generator=g), None, _ids(b, g, 6))),
    ]
    ids = lambda b, g: (_ids(b, g),)  # noqa: E731
    pixels = lambda s: (lambda b, g: (torch.randn(b, 3, s, s, generator=g),))  # noqa: E731
    for name, (model, config, extra) in _HF_DECODERS.items():
        specs.append((name, "decoder", mk(model, config, **dict(_TXT, **no_cache, **extra)), ids))
    for name, (model, config, extra) in _HF_ENCODERS.items():
        specs.append((name, "encoder", mk(model, config, **dict(_TXT, **extra)), ids))
    for name, (model, config, kw, size) in _HF_VISION.items():
        specs.append((name, "vision", mk(model, config, **kw), pixels(size)))
    for name, (task, model, config, kw, inp) in _HF_MORE.items():
        specs.append((name, task, mk(model, config, **kw), inp))
    return {n: ModelSpec("transformers", n, task, f, inp) for n, task, f, inp in specs}


# More architectures, each a small config over _TXT: name -> (model class, config class, overrides).
_GQA = dict(num_key_value_heads=1)
_MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_HF_DECODERS = {
    "mistral": ("MistralForCausalLM", "MistralConfig", _GQA),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _GQA),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_GQA, head_dim=16)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_GQA, head_dim=16)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_GQA, head_dim=16)),
    "phi": ("PhiForCausalLM", "PhiConfig", {}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(pad_token_id=0, eos_token_id=2, bos_token_id=1)),
    "falcon": ("FalconForCausalLM", "FalconConfig", {}),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {}),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(n_embd=_H, n_layer=2, n_head=2, rotary_dim=8, n_positions=64)),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=_H)),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(n_layer=2, n_head=2)),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(n_embd=_H, n_layer=2, n_head=2, n_positions=64)),
    "mpt": ("MptForCausalLM", "MptConfig", dict(d_model=_H, n_layers=2, n_heads=2, max_seq_len=64)),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", _GQA),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", _GQA),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", _GQA),
    "cohere": ("CohereForCausalLM", "CohereConfig", _GQA),
    "granite": ("GraniteForCausalLM", "GraniteConfig", _GQA),
    "nemotron": ("NemotronForCausalLM", "NemotronConfig", _GQA),
    "persimmon": ("PersimmonForCausalLM", "PersimmonConfig", {}),
    "biogpt": ("BioGptForCausalLM", "BioGptConfig", {}),
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(state_size=8)),
    "rwkv": ("RwkvForCausalLM", "RwkvConfig", {}),
    "recurrent_gemma": ("RecurrentGemmaForCausalLM", "RecurrentGemmaConfig", _GQA),
    # mixtures of experts
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(_GQA, **_MOE, shared_expert_intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(_GQA, **_MOE, head_dim=16)),
    "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", dict(_GQA, **_MOE)),
    "jamba": ("JambaForCausalLM", "JambaConfig", dict(_GQA, **_MOE)),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(_GQA, **_MOE)),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                    dict(num_key_value_heads=2, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                         n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
                         kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
}
_HF_ENCODERS = {
    "deberta_v2": ("DebertaV2Model", "DebertaV2Config", {}),
    "electra": ("ElectraModel", "ElectraConfig", dict(embedding_size=16)),
    "albert": ("AlbertModel", "AlbertConfig", dict(embedding_size=16)),
    "mobilebert": ("MobileBertModel", "MobileBertConfig", dict(embedding_size=16, intra_bottleneck_size=16,
                                                               true_hidden_size=16)),
}
_VIT = dict(hidden_size=_H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_HF_VISION = {  # name -> (model class, config class, config, image size)
    "swin": ("SwinModel", "SwinConfig", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                             num_heads=[1, 2], window_size=4), 32),
    "convnext": ("ConvNextModel", "ConvNextConfig", dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), 32),
    "segformer": ("SegformerModel", "SegformerConfig", dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                            hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                                                            decoder_hidden_size=16, patch_sizes=[7, 3],
                                                            strides=[4, 2]), 32),
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(_VIT, image_size=28, patch_size=14), 28),
    "beit": ("BeitModel", "BeitConfig", dict(_VIT, image_size=32, patch_size=8, use_relative_position_bias=True), 32),
    "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(_VIT, image_size=32, patch_size=8), 32),
    "resnet": ("ResNetModel", "ResNetConfig", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]), 32),
    "mobilevit": ("MobileViTModel", "MobileViTConfig", dict(image_size=32, hidden_sizes=[16, 24, 32],
                                                            neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]), 32),
}


def _ids_n(n: int):
    return lambda b, g: (_ids(b, g, n),)


def _seq2seq(b, g):  # (input_ids, attention_mask, decoder_input_ids)
    return _ids(b, g), None, _ids(b, g, 6)


def _randn(*shape):
    return lambda b, g: (torch.randn(b, *shape, generator=g),)


# Architectures with their own config fields or inputs:
# name -> (task, model class, config class, config, inputs(batch, generator))
_HF_MORE = {
    # encoders: relative / sparse / local attention, hashing, convolutions, Fourier mixing
    "xlnet": ("encoder", "XLNetModel", "XLNetConfig", dict(vocab_size=_VOCAB, d_model=_H, n_layer=2, n_head=2,
                                                           d_inner=64), _ids_n(_SEQ)),
    "reformer": ("encoder", "ReformerModel", "ReformerConfig",
                 dict(vocab_size=_VOCAB, hidden_size=_H, num_attention_heads=2, attention_head_size=16,
                      feed_forward_size=64, axial_pos_shape=(4, 4), axial_pos_embds_dim=(16, 16),
                      max_position_embeddings=16, attn_layers=["local", "lsh"], local_attn_chunk_length=4,
                      lsh_attn_chunk_length=4, num_buckets=2, is_decoder=False), _ids_n(16)),
    "longformer": ("encoder", "LongformerModel", "LongformerConfig", dict(_TXT, attention_window=4, pad_token_id=0),
                   _ids_n(16)),
    "big_bird": ("encoder", "BigBirdModel", "BigBirdConfig", dict(_TXT, attention_type="original_full"), _ids_n(_SEQ)),
    "funnel": ("encoder", "FunnelModel", "FunnelConfig", dict(vocab_size=_VOCAB, d_model=_H, n_head=2, d_head=16,
                                                              d_inner=64, block_sizes=[1, 1]), _ids_n(_SEQ)),
    "fnet": ("encoder", "FNetModel", "FNetConfig", dict(_TXT, use_tpu_fourier_optimizations=False), _ids_n(_SEQ)),
    "canine": ("encoder", "CanineModel", "CanineConfig",
               dict(hidden_size=_H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    num_hash_buckets=64, num_hash_functions=2, local_transformer_stride=4, downsampling_rate=4),
               _ids_n(16)),
    "squeezebert": ("encoder", "SqueezeBertModel", "SqueezeBertConfig",
                    dict(_TXT, embedding_size=_H, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
                         intermediate_groups=4, output_groups=2), _ids_n(_SEQ)),
    "mpnet": ("encoder", "MPNetModel", "MPNetConfig", _TXT, _ids_n(_SEQ)),
    "convbert": ("encoder", "ConvBertModel", "ConvBertConfig", dict(_TXT, embedding_size=_H, head_ratio=2,
                                                                    conv_kernel_size=3), _ids_n(_SEQ)),
    "perceiver": ("encoder", "PerceiverModel", "PerceiverConfig",
                  dict(num_latents=8, d_latents=_H, d_model=_H, num_blocks=1, num_self_attends_per_block=1,
                       num_self_attention_heads=2, num_cross_attention_heads=1), _randn(10, _H)),
    # decoders
    "ctrl": ("decoder", "CTRLModel", "CTRLConfig", dict(vocab_size=_VOCAB, n_embd=_H, n_layer=2, n_head=2, dff=64,
                                                        n_positions=64, use_cache=False), _ids_n(_SEQ)),
    "xglm": ("decoder", "XGLMModel", "XGLMConfig", dict(vocab_size=_VOCAB, d_model=_H, num_layers=2, attention_heads=2,
                                                        ffn_dim=64, max_position_embeddings=64, use_cache=False),
             _ids_n(_SEQ)),
    "codegen": ("decoder", "CodeGenModel", "CodeGenConfig", dict(vocab_size=_VOCAB, n_embd=_H, n_layer=2, n_head=2,
                                                                 rotary_dim=8, n_positions=64, use_cache=False),
                _ids_n(_SEQ)),
    "gpt_neo": ("decoder", "GPTNeoModel", "GPTNeoConfig",
                dict(vocab_size=_VOCAB, hidden_size=_H, num_layers=2, num_heads=2,
                     attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=64,
                     use_cache=False), _ids_n(_SEQ)),
    "mamba2": ("decoder", "Mamba2Model", "Mamba2Config", dict(vocab_size=_VOCAB, hidden_size=_H, num_hidden_layers=2,
                                                              num_heads=4, head_dim=16, state_size=8, n_groups=1,
                                                              expand=2, chunk_size=4, use_cache=False), _ids_n(_SEQ)),
    "falcon_mamba": ("decoder", "FalconMambaModel", "FalconMambaConfig",
                     dict(vocab_size=_VOCAB, hidden_size=_H, num_hidden_layers=2, state_size=8, use_cache=False),
                     _ids_n(_SEQ)),
    "olmoe": ("decoder", "OlmoeModel", "OlmoeConfig", dict(_TXT, num_experts=4, num_experts_per_tok=2,
                                                           use_cache=False), _ids_n(_SEQ)),
    "phimoe": ("decoder", "PhimoeModel", "PhimoeConfig", dict(_TXT, num_key_value_heads=1, num_local_experts=4,
                                                              num_experts_per_tok=2, use_cache=False), _ids_n(_SEQ)),
    # encoder-decoders (a routed mixture of experts among them)
    "switch_transformers": ("encoder-decoder", "SwitchTransformersModel", "SwitchTransformersConfig",
                            dict(vocab_size=_VOCAB, d_model=_H, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                                 num_heads=2, num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1,
                                 decoder_start_token_id=0, use_cache=False), _seq2seq),
    "pegasus": ("encoder-decoder", "PegasusModel", "PegasusConfig",
                dict(vocab_size=_VOCAB, d_model=_H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     use_cache=False), _seq2seq),
    "mt5": ("encoder-decoder", "MT5Model", "MT5Config", dict(vocab_size=_VOCAB, d_model=_H, d_kv=16, d_ff=64,
                                                             num_layers=1, num_heads=2, decoder_start_token_id=0,
                                                             use_cache=False), _seq2seq),
    "longt5": ("encoder-decoder", "LongT5Model", "LongT5Config",
               dict(vocab_size=_VOCAB, d_model=_H, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                    encoder_attention_type="transient-global", local_radius=2, global_block_size=4,
                    decoder_start_token_id=0, use_cache=False), _seq2seq),
    # vision, video, speech, time series, text + image
    "levit": ("vision", "LevitModel", "LevitConfig", dict(image_size=64, hidden_sizes=[16, 24, 32],
                                                          num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                                                          key_dim=[8, 8, 8]), _randn(3, 64, 64)),
    "detr": ("vision", "DetrModel", "DetrConfig",
             dict(use_timm_backbone=False, use_pretrained_backbone=False,
                  backbone_config=dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       out_features=["stage2"]),
                  d_model=_H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5), _randn(3, 64, 64)),
    "timesformer": ("video", "TimesformerModel", "TimesformerConfig",
                    dict(image_size=32, patch_size=8, num_frames=2, hidden_size=_H, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64), _randn(2, 3, 32, 32)),
    "hubert": ("speech", "HubertModel", "HubertConfig",
               dict(hidden_size=_H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=2), _randn(1600)),
    "patchtst": ("time-series", "PatchTSTModel", "PatchTSTConfig",
                 dict(num_input_channels=3, context_length=32, patch_length=4, patch_stride=4, d_model=_H,
                      num_hidden_layers=1, num_attention_heads=2, ffn_dim=64), _randn(32, 3)),
    "clip": ("multimodal", "CLIPModel", "CLIPConfig",
             dict(text_config=dict(_TXT, vocab_size=_VOCAB),
                  vision_config=dict(hidden_size=_H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8), projection_dim=16),
             lambda b, g: (_ids(b, g), torch.randn(b, 3, 32, 32, generator=g))),
}


_CACHE: dict[str, dict[str, ModelSpec]] = {}


def specs(source: str) -> dict[str, ModelSpec]:
    if source not in SOURCES:
        raise KeyError(f"unknown source {source!r}; choose from {', '.join(SOURCES)} (or timm)")
    if source not in _CACHE:
        _CACHE[source] = _tv_specs() if source == "torchvision" else _hf_specs()
    return _CACHE[source]


def names(source: str) -> list[str]:
    return sorted(specs(source))


def get(source: str, name: str) -> ModelSpec:
    if ":" in name and name.split(":", 1)[0] in SOURCES:
        source, name = name.split(":", 1)
    s = specs(source)
    if name not in s:
        close = difflib.get_close_matches(name, list(s), n=3)
        raise KeyError(f"no {source} model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return s[name]


# ---------------------------------------------------------------------------------------------
# one zoo row
# ---------------------------------------------------------------------------------------------
def check_job(source: str, name: str, stage: Callable[..., None] | None = None, *, steps: int = 3,
              verify: bool | str = True, max_params: int | None = 60_000_000, batch: int = 2, seed: int = 0) -> dict:
    """The full check of one model as a zoo row (the fields of ``cli.jobs.check_job``)."""
    from nerofy.check import check_model

    from . import jobs

    stage = stage or (lambda *a, **k: None)
    spec = get(source, name)
    row, src, t0 = jobs.start_row(spec.full_name, "check", stage)
    row["family"], row["source"] = spec.task, source
    try:  # count on meta first: a model over max_params is never built for real
        n = sum(p.numel() for p in spec.create(meta=True).parameters())
    except Exception:
        n = None
    if n is not None and max_params and n > max_params:
        row["total_params"], row["status"] = n, "skipped_size"
        row["error"] = f"{n / 1e6:.1f}M parameters > --max-params {max_params / 1e6:.0f}M"
        return jobs._finish(row, t0, src)
    if n is not None and (no_fit := jobs.cannot_fit(n, row["base_rss_mb"])):
        row["total_params"], row["status"], row["error"] = n, "oom", no_fit
        return jobs._finish(row, t0, src)
    try:
        torch.manual_seed(seed)
        model = spec.create()
        inputs = spec.inputs(batch, seed)
    except Exception as e:
        row["status"], row["error"] = ("oom" if jobs.is_oom(e) else "fail_create"), jobs._err(e)
        return jobs._finish(row, t0, src)
    row["times"]["create"] = round(time.perf_counter() - t0, 4)
    row["total_params"] = sum(p.numel() for p in model.parameters())
    stage("counted", total_params=row["total_params"])
    if max_params and row["total_params"] > max_params:
        row["status"] = "skipped_size"
        row["error"] = f"{row['total_params'] / 1e6:.1f}M parameters > --max-params {max_params / 1e6:.0f}M"
        return jobs._finish(row, t0, src)
    stage("check")
    r = check_model(model, inputs, steps=steps, verify=verify, loss_fn=spec.loss,
                    plan_inputs=inputs)
    if jobs.needs_batch_2(batch, r.error):
        del model, inputs, r
        jobs.release_memory()
        return jobs.batch_2_row(check_job(source, name, stage, steps=steps, verify=verify, max_params=max_params,
                                          batch=2, seed=seed))
    jobs.fill_check_row(row, r, steps, batch, verify)
    return jobs._finish(row, t0, src)


def structural_job(source: str, name: str, stage: Callable[..., None] | None = None) -> dict:
    """Trace + plan + rewrite on the meta device, as a zoo row (the fields of ``jobs.structural_job``)."""
    from . import jobs

    stage = stage or (lambda *a, **k: None)
    spec = get(source, name)
    row, src, t0 = jobs.start_row(spec.full_name, "structural", stage)
    row["family"], row["source"] = spec.task, source
    try:
        model = spec.create(meta=True)
    except Exception as e:
        row["status"], row["error"] = ("oom" if jobs.is_oom(e) else "fail_create"), jobs._err(e)
        return jobs._finish(row, t0, src)
    row["times"]["create"] = round(time.perf_counter() - t0, 4)
    row["total_params"] = sum(p.numel() for p in model.parameters())
    stage("counted", total_params=row["total_params"])
    if row["total_params"] <= PLAN_FOR_REAL_MAX:
        # Hugging Face models and detectors do not trace on meta (data-dependent control flow,
        # .item()): small ones are planned from one real forward of their example inputs, and the
        # plan is applied on meta as for every other model
        torch.manual_seed(0)
        plan_from = (spec.create(), spec.inputs(2, 0))
        row["note"] = "planned from one real forward of the example inputs; rewritten on meta"
    else:  # bigger ones trace on meta with the example inputs' shapes (torchvision models declare no input size)
        from nerofy.trace import to_meta

        plan_from = (model, to_meta(spec.inputs(2, 0)))
    row["status"] = jobs.structural(model, row, stage, plan_from=plan_from)
    return jobs._finish(row, t0, src)


PLAN_FOR_REAL_MAX = 60_000_000


__all__ = ["SOURCES", "ModelSpec", "specs", "names", "get", "check_job", "structural_job"]
