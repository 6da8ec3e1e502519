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
    fitted = hf_shrink.fit_params(cls, small, LIMIT // 4, hf._count_meta, log)
    assert hf._count_meta(cls, fitted) <= LIMIT // 4
    assert any(p[-1] == key for p, _, _ in log), log
    assert getattr(fitted, key) < getattr(small, key)


def test_validator_tied_keys_are_repaired_together():
    # mamba2 validates hidden_size * expand == num_heads * head_dim: hidden alone is refused
    cls, small = _shrunk("mamba2")
    fitted = hf_shrink.fit_params(cls, small, LIMIT // 4, hf._count_meta)
    assert fitted.hidden_size < small.hidden_size
    assert fitted.hidden_size * fitted.expand == fitted.num_heads * fitted.head_dim
    assert hf._count_meta(cls, fitted) <= LIMIT


def test_build_fits_and_runs_forward():
    model, info = hf.build("xlm", "small")
    assert sum(p.numel() for p in model.parameters()) <= LIMIT
    assert info["config"].emb_dim % info["config"].n_heads == 0
    with torch.no_grad():
        model(**hf.example_inputs(model))


def test_under_budget_configs_are_left_alone():
    cls, small = _shrunk("bert")
    assert hf._count_meta(cls, small) <= LIMIT
    assert hf_shrink.fit_params(cls, small, LIMIT, hf._count_meta) is small
