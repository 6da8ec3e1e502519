"""Data and models for benchmarks/training_quality.py (kept apart so that script stays about training).

Every builder returns a fresh, plain (unwrapped) model from the current torch RNG state: the caller
seeds first, so every configuration of one seed starts from the same weights.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from char_lm import MODULES, CharLM  # noqa: E402
from train_timm_digits import images  # noqa: E402


# ---- data ----------------------------------------------------------------------------------------
def digits(test_size: int = 397):
    """scikit-learn's digits, 1400 train / 397 test (stratified, random_state=0): 64 features /16,
    standardised with the train mean and std (std floored at 0.1: some border pixels are ~always 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=0, stratify=y)
    mu, sd = Xtr.mean(0), np.maximum(Xtr.std(0), 0.1)
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return f(Xtr), torch.tensor(ytr, dtype=torch.long), f(Xte), torch.tensor(yte, dtype=torch.long)


def digits_images(size: int = 16):
    """The same split as images: one channel, upsampled bilinearly from 8x8 (after standardising)."""
    Xtr, ytr, Xte, yte = digits()
    return images(Xtr, size), ytr, images(Xte, size), yte


def load_bytes():
    """char_lm.load_text's stdlib source, but as raw bytes 0..255 (no ASCII folding); 90/10 split."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in MODULES if (lib / f).exists()]
    data = torch.tensor(list(b"\n".join((lib / f).read_bytes() for f in files)), dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:], files


# ---- models --------------------------------------------------------------------------------------
def mlp(depth: int, width: int) -> nn.Module:
    """Plain ReLU MLP, ``depth`` linear layers, no normalisation: 64 -> width x (depth-1) -> 10."""
    layers = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def charlm() -> nn.Module:
    return CharLM(vocab=128, d=128, layers=3, heads=4, ctx=64)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # use_cache=False: no key/value cache is built in training forwards (it changes nothing else)
    cfg = GPT2Config(vocab_size=256, n_positions=64, n_embd=96, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return GPT2LMHeadModel(cfg)  # lm_head.weight is tied to transformer.wte.weight


MASK_ID = 256  # bert's [MASK]: one id past the 256 byte values


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # vocab 257 = bytes + [MASK]; pad_token_id 0 makes word_embeddings row 0 (byte 0, absent from the
    # text) a padding row; use_cache=False changes nothing for an encoder (as in gpt2)
    cfg = BertConfig(vocab_size=MASK_ID + 1, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=384, max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0, tie_word_embeddings=True, use_cache=False)
    return BertForMaskedLM(cfg)  # cls.predictions.decoder.weight is tied to bert.embeddings.word_embeddings.weight


def vit_tiny() -> nn.Module:
    import timm
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=2, depth=6, in_chans=1, num_classes=10)


def resnet18() -> nn.Module:
    import timm
    return timm.create_model("resnet18", in_chans=1, num_classes=10)


def mobilenetv2() -> nn.Module:
    """A BN CNN with a long chain of layers in series: 23 from input to head (residual sums only
    inside each stage), so nerofy.wrap's cap factor applies (12 / 23)."""
    import timm
    return timm.create_model("mobilenetv2_100", in_chans=1, num_classes=10)
