"""The command line through Typer's CliRunner (and one real subprocess of the installed script)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("typer")
pytest.importorskip("timm")
from typer.testing import CliRunner  # noqa: E402

from nerofy_cli import models as M  # noqa: E402
from nerofy_cli.app import app  # noqa: E402

TINY = "test_vit"  # 0.37M parameters, 160x160 input: a fast, real timm model


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A module of the user's own models, importable as ``nz_user_models`` (here and in workers)."""
    (tmp_path / "nz_user_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, width=16):
                super().__init__()
                self.fc1 = nn.Linear(8, width)
                self.fc2 = nn.Linear(width, 4)

            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(x)))

        def net(width=16):
            return Net(width)

        def net_with_size():
            m = Net()
            m.pretrained_cfg = {"input_size": (8,)}
            return m

        not_a_model = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return "nz_user_models"


def _json(result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------
def test_convert_json_is_the_only_stdout(runner):
    res = runner.invoke(app, ["convert", TINY, "--json", "--steps", "2"])
    d = _json(res)
    assert d["status"] == "pass", d["error"]
    assert d["model"] == TINY and d["input_size"] == [3, 160, 160] and d["batch"] == 2
    assert d["frontend"] == "fx"
    assert d["params_by_role"]["neuron"] > 0 and 0.5 < d["constrained_share"] <= 1
    assert sum(d["params_by_role"].values()) == d["total_params"] == M.count_params(M.create(TINY))
    assert d["axes"]["fail"] == 0 and d["axes"]["ok"] > 0
    assert d["max_constraint_error"] < 1e-4 and len(d["loss"]) == 2
    assert {"create", "plan", "verify", "wrap", "forward", "backward", "step"} <= set(d["times"])
    assert d["peak_rss_mb"] >= d["start_rss_mb"] > 0
    assert set(d["versions"]) >= {"torch", "timm", "nerofy"}
    assert "planning" in res.stderr  # progress goes to stderr


def test_convert_prints_a_summary_and_the_plan(runner):
    res = runner.invoke(app, ["convert", f"timm:{TINY}", "--show-plan", "--steps", "1"])
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    for text in ("pass", "tracer: fx", "constrained:", "neuron", "peak memory", "times:", "fan-in", "reason",
                 "head.weight", "axes verified"):
        assert text in out, text


def test_convert_and_plan_models_named_as_zoo_rows_name_them(runner, monkeypatch):
    """'transformers:NAME' / 'torchvision:NAME' build nerofy's listed model with its own inputs and
    loss; an unknown one names the closest; a package path stays an import."""
    pytest.importorskip("transformers")
    d = _json(runner.invoke(app, ["convert", "transformers:gpt2", "--json", "--steps", "1"]))
    assert d["status"] == "pass" and d["frontend"] == "record" and d["batch"] == 2 and d["input_size"] == [16]
    res = runner.invoke(app, ["plan", "transformers:gpt2"])
    assert res.exit_code == 0 and "transformer.h.0.mlp.c_fc.weight" in res.stdout
    monkeypatch.delenv("NEROFY_DEBUG", raising=False)
    res = runner.invoke(app, ["convert", "torchvision:resnet81"])
    assert res.exit_code == 1 and "no torchvision model 'resnet81'" in res.stderr
    assert "torchvision:resnet18" in res.stderr and res.stdout == ""
    res = runner.invoke(app, ["convert", "transformers:gpt2", "--input-size", "3,32,32"])
    assert res.exit_code == 1 and "brings its own example inputs" in res.stderr
    assert M.parse_spec("torchvision:resnet18") == ("source", "torchvision:resnet18")
    assert M.parse_spec("torchvision.models:resnet18") == ("import", "torchvision.models:resnet18")


def test_unknown_model_is_one_red_line_with_closest_matches(runner, monkeypatch):
    monkeypatch.delenv("NEROFY_DEBUG", raising=False)
    res = runner.invoke(app, ["convert", "resnet5"])
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "unknown model 'resnet5'" in lines[0] and "resnet50" in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_debug_shows_the_traceback(runner, monkeypatch):
    monkeypatch.setenv("NEROFY_DEBUG", "1")
    res = runner.invoke(app, ["convert", "resnet5"])
    assert res.exit_code != 0
    assert isinstance(res.exception, M.UnknownModel)


def test_output_wrapped_and_baked_state_dicts(runner, tmp_path):
    wrapped, plain = tmp_path / "w.pt", tmp_path / "p.pt"
    res = runner.invoke(app, ["convert", TINY, "--steps", "1", "--output", str(wrapped), "--json"])
    assert _json(res)["output"]["baked"] is False
    res = runner.invoke(app, ["convert", TINY, "--steps", "1", "--output", str(plain), "--bake", "--json"])
    assert _json(res)["output"]["baked"] is True
    sw, sp = torch.load(wrapped, weights_only=True), torch.load(plain, weights_only=True)
    assert any(".parametrizations." in k for k in sw)
    fresh = M.create(TINY)
    assert set(sp) == set(fresh.state_dict())  # plain keys
    fresh.load_state_dict(sp)
    # the saved weights are the wrapped model's weights before any training step: baked == projected
    renamed, n = M.plain_keys(sw)
    assert n > 0 and set(renamed) == set(sp)
    for k, v in renamed.items():
        torch.testing.assert_close(v, sp[k], atol=1e-6, rtol=1e-5)
    # both load back through --checkpoint
    for path in (wrapped, plain):
        res = runner.invoke(app, ["convert", TINY, "--steps", "1", "--checkpoint", str(path), "--json"])
        d = _json(res)
        assert d["status"] == "pass" and d["checkpoint"]["tensors"] == len(sp)
        assert d["checkpoint"]["missing"] == [] and d["checkpoint"]["unexpected"] == []


def test_checkpoint_wrapped_in_a_dict_with_module_prefix(runner, tmp_path):
    m = M.create(TINY)
    path = tmp_path / "ck.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, path)
    d = _json(runner.invoke(app, ["convert", TINY, "--steps", "1", "--checkpoint", str(path), "--json"]))
    assert d["status"] == "pass" and d["checkpoint"]["tensors"] == len(m.state_dict())


def test_checkpoint_keeps_the_trained_function_by_default(runner, tmp_path):
    """--checkpoint wraps with keep="function": the saved wrapped model computes what the loaded
    (trained) weights did; --keep direction is the paper's projection, which does not."""
    m = M.create(TINY)
    torch.manual_seed(1)
    with torch.no_grad():  # "trained": every weight moved off its init, neurons with means
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p) + 0.01)
    path, out = tmp_path / "trained.pt", tmp_path / "kept.pt"
    torch.save(m.state_dict(), path)
    d = _json(runner.invoke(app, ["convert", TINY, "--steps", "1", "--checkpoint", str(path), "--output", str(out),
                                  "--bake", "--json"]))
    assert d["status"] == "pass" and d["keep"] == "function" and d["wrap_output_change"] < 1e-5
    assert any("keep='function'" in w for w in d["warnings"])
    baked = torch.load(out, weights_only=True)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(baked[k], v, atol=1e-5, rtol=1e-5)
    d = _json(runner.invoke(app, ["convert", TINY, "--steps", "1", "--checkpoint", str(path), "--keep", "direction",
                                  "--json"]))
    assert d["keep"] == "direction" and d["wrap_output_change"] is None
    res = runner.invoke(app, ["convert", TINY, "--keep", "weights"])
    assert res.exit_code == 1 and "--keep weights: choose from direction, function" in res.stderr


def test_checkpoint_that_does_not_fit(runner, tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"nope.weight": torch.zeros(3)}, path)
    res = runner.invoke(app, ["convert", TINY, "--checkpoint", str(path)])
    assert res.exit_code == 1 and "does not fit the model" in res.stderr
    res = runner.invoke(app, ["convert", TINY, "--checkpoint", str(tmp_path / "missing.pt")])
    assert res.exit_code == 1 and "checkpoint not found" in res.stderr


def test_bake_needs_output(runner):
    res = runner.invoke(app, ["convert", TINY, "--bake"])
    assert res.exit_code == 1 and "--bake needs --output" in res.stderr


def test_user_factory(runner, user_models):
    d = _json(runner.invoke(app, ["convert", f"{user_models}:net", "--input-size", "8", "--arg", "width=32",
                                  "--json"]))
    assert d["status"] == "pass" and d["tensors_by_role"]["neuron"] == 2 and d["total_params"] == 8 * 32 + 32 + 32 * 4 + 4
    res = runner.invoke(app, ["convert", f"{user_models}:net"])
    assert res.exit_code == 1 and "--input-size" in res.stderr
    res = runner.invoke(app, ["convert", f"{user_models}:nett"])
    assert res.exit_code == 1 and "closest: net" in res.stderr
    res = runner.invoke(app, ["convert", f"{user_models}:not_a_model"])
    assert res.exit_code == 1 and "not a model factory" in res.stderr
    res = runner.invoke(app, ["convert", "no_such_pkg_xyz.mod:f"])
    assert res.exit_code == 1 and "cannot import" in res.stderr


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------
def test_plan_table_and_json(runner):
    res = runner.invoke(app, ["plan", TINY])
    assert res.exit_code == 0, res.stderr
    assert "tracer: fx" in res.stdout and "pos_embed" in res.stdout and "head.weight" in res.stdout
    d = _json(runner.invoke(app, ["plan", TINY, "--json"]))
    roles = {e["name"]: e["role"] for e in d["entries"]}
    assert set(roles) == set(dict(M.create(TINY).named_parameters()))
    assert roles["head.weight"] == "neuron" and roles["blocks.0.attn.qkv.weight"] == "neuron"
    assert d["frontend"] == "fx"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def test_parse_spec_and_sizes():
    assert M.parse_spec("resnet50") == ("timm", "resnet50")
    assert M.parse_spec("timm:resnet50") == ("timm", "resnet50")
    assert M.parse_spec("pkg.mod:make") == ("import", "pkg.mod:make")
    assert M.parse_size("3,224,224") == (3, 224, 224) == M.parse_size("3x224x224")
    with pytest.raises(M.CliError):
        M.parse_size("3,a")
    assert M.parse_kwargs(["num_classes=10", "act=gelu", "drop=0.1"]) == {"num_classes": 10, "act": "gelu", "drop": 0.1}
    with pytest.raises(M.CliError):
        M.parse_kwargs(["oops"])
    assert M.family("resnet50") == "resnet" and M.family("vit_tiny_patch16_224") == "vision_transformer"


def test_create_on_meta_uses_no_memory():
    m = M.create("resnet50", meta=True)
    assert all(p.is_meta for p in m.parameters()) and M.count_params(m) > 20e6


def test_python_dash_m_nerofy_runs_the_same_app():
    res = subprocess.run([sys.executable, "-m", "nerofy", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for cmd in ("convert", "plan", "zoo", "report"):
        assert cmd in res.stdout


def test_library_does_not_import_the_cli_stack():
    code = ("import sys, nerofy, nerofy.check, nerofy.rewrite, nerofy.trace; "
            "print(sorted(m for m in ('typer', 'rich', 'timm', 'nerofy_cli') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_installed_console_script_in_a_real_subprocess(tmp_path):
    exe = shutil.which("nerofy")
    if exe is None:
        pytest.skip("the nerofy console script is not installed (pip install -e '.[cli]')")
    res = subprocess.run([exe, "convert", TINY, "--json", "--steps", "1"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["status"] == "pass" and d["frontend"] == "fx"
    res = subprocess.run([exe, "convert", "definitely_not_a_model"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "NEROFY_DEBUG": "0"})
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "unknown model" in res.stderr
