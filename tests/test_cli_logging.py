"""The library logs through `logging`; the CLI shows those records on stderr (-v for info)."""
import pytest

pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from nerofy_cli.app import app  # noqa: E402

FACTORY = '''
import torch.nn as nn
def build():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    nn.init.zeros_(m[2].weight)  # a zero-init head: nerofy gives those neurons a direction, and says so
    return m
'''


def test_library_info_reaches_stderr_only_with_verbose(tmp_path, monkeypatch):
    (tmp_path / "zero_head.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    quiet = runner.invoke(app, ["convert", "zero_head:build", "--input-size", "4", "--no-verify"])
    assert quiet.exit_code == 0, quiet.stderr
    assert "no direction" not in quiet.stderr
    loud = runner.invoke(app, ["-v", "convert", "zero_head:build", "--input-size", "4", "--no-verify"])
    assert loud.exit_code == 0, loud.stderr
    assert "2 of 2 neurons had no direction" in loud.stderr and "no direction" not in loud.stdout
