"""``nerofy zoo`` and ``nerofy report``: JSONL safety, selection, the worker pool (timeouts, memory
guard, crashes, resume, a kill mid-run) and the report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("typer")
pytest.importorskip("timm")
from typer.testing import CliRunner  # noqa: E402

from nerofy.check import STATUSES  # noqa: E402
from nerofy_cli import jobs as J  # noqa: E402
from nerofy_cli import report as R  # noqa: E402
from nerofy_cli import zoo as Z  # noqa: E402
from nerofy_cli.app import app  # noqa: E402


@pytest.fixture
def zoo_models(tmp_path, monkeypatch):
    """Factories that pass, hang, crash the interpreter and eat memory, importable by workers."""
    (tmp_path / "nz_zoo_models.py").write_text(textwrap.dedent("""
        import os, time
        import torch
        from torch import nn

        def _net():
            m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
            m.pretrained_cfg = {"input_size": (8,)}
            return m

        def ok():
            return _net()

        def ok2():
            return _net()

        def slow():
            time.sleep(1.5)
            return _net()

        def hang():
            time.sleep(600)

        def crash():
            os._exit(3)

        def hog():
            x = torch.ones(400 * 1024 * 1024, device="cpu")  # 1.6 GB, really touched
            time.sleep(60)
            return x

        def bn_head():  # BatchNorm on one value per channel at batch 1 (a BN after global pooling)
            m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
            m.pretrained_cfg = {"input_size": (8,)}
            return m

        def broken():
            m = _net()
            m.forward = lambda x: x.reshape(-1, 5)  # fails in the forward
            return m
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return "nz_zoo_models"


def _rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------
def test_writer_appends_whole_lines_and_resume_cuts_a_torn_tail(tmp_path):
    path = str(tmp_path / "r.jsonl")
    with Z.JsonlWriter(path) as w:
        w.write({"name": "a", "status": "pass"})
        w.write({"name": "b", "status": "fail_plan"})
    with open(path, "ab") as f:
        f.write(b'{"name": "c", "stat')  # a run killed mid-write
    assert [r["name"] for r in Z.read_rows(path)] == ["a", "b"]  # torn line ignored
    with Z.JsonlWriter(path) as w:  # opening for append repairs the tail first
        w.write({"name": "c", "status": "pass"})
    assert [r["name"] for r in _rows(path)] == ["a", "b", "c"]
    assert Z.repair_tail(path) == 0
    with open(path, "ab") as f:
        f.write(b"x" * 100_000)  # a torn line longer than the search chunk
    assert Z.repair_tail(path) == 100_000 and len(_rows(path)) == 3


def test_writer_follows_its_path_when_the_file_is_replaced(tmp_path, capsys):
    """`git stash` / `checkout` replace the results file while a sweep runs: new rows go to the file
    at the path, and rows the replacement lacks are copied over, never lost in the unlinked file."""
    path = tmp_path / "r.jsonl"
    with Z.JsonlWriter(str(path)) as w:
        w.write({"name": "a", "status": "pass"})
        w.write({"name": "b", "status": "pass"})
        old = path.read_bytes()
        path.with_suffix(".new").write_bytes(old.splitlines(keepends=True)[0])  # an older version: only "a"
        os.replace(path.with_suffix(".new"), path)
        w.write({"name": "c", "status": "pass"})
        assert [r["name"] for r in _rows(path)] == ["a", "b", "c"]
        path.unlink()  # removed altogether: recreated with every row
        w.write({"name": "d", "status": "pass"})
    assert [r["name"] for r in _rows(path)] == ["a", "b", "c", "d"]
    assert "was replaced while running" in capsys.readouterr().err


def test_select_and_shard():
    names = ["resnet18", "resnet50", "vit_tiny", "vit_small", "convnext_tiny"]
    assert Z.select(names, ["resnet*"]) == ["resnet18", "resnet50"]
    assert Z.select(names, ["timm:vit_tiny"]) == ["vit_tiny"]
    assert Z.select(names, ["tiny"]) == ["convnext_tiny", "vit_tiny"]  # a bare word: substring
    assert Z.select(names, None, ["vit*"]) == ["convnext_tiny", "resnet18", "resnet50"]
    shards = [Z.select(names, shard=(i, 3)) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(names) and all(shards)
    assert Z.select(names, ["resnet18", "pkg.mod:make"]) == ["resnet18", "pkg.mod:make"]
    # another source's names carry its prefix: a prefixed glob is a pattern, not a user's factory
    tv = ["torchvision:ssd300_vgg16", "torchvision:ssdlite320", "torchvision:vit_b_16"]
    assert Z.select(tv, ["torchvision:ssd*"]) == tv[:2]
    assert Z.select(tv, ["torchvision:vit"], ["torchvision:*lite*"]) == tv[2:]
    assert Z.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(Z.CliError):
            Z.parse_shard(bad)


def test_compare_expected():
    rows = {"a": {"status": "pass"}, "b": {"status": "fail_plan", "error": "boom"}, "c": {"status": "pass"}}
    regress, improve = Z.compare_expected(rows, {"a": "pass", "b": "pass", "c": "fail_forward", "d": "pass"})
    assert regress == ["b: expected pass, got fail_plan (boom)", "d: expected pass, no row"]
    assert improve == ["c: expected fail_forward, got pass"]


# ---------------------------------------------------------------------------------------------
# jobs (in-process)
# ---------------------------------------------------------------------------------------------
def test_structural_job_on_meta():
    row = J.structural_job("test_vit")
    assert row["status"] == "pass" and row["mode"] == "structural" and row["tracer"] == "fx"
    assert row["total_params"] == sum(row["params_by_role"].values()) > 0
    assert set(row["times"]) >= {"create", "plan", "rewrite", "total"}
    assert row["peak_rss_mb"] > 0 and row["versions"]["timm"]
    json.dumps(row)


def test_check_job_and_size_skip():
    row = J.check_job("test_resnet", steps=1)
    assert row["status"] == "pass", row["error"]
    assert row["axes"]["fail"] == 0 and row["input_size"] == [3, 160, 160] and row["tracer"] == "fx"
    big = J.check_job("test_resnet", steps=1, max_params=1000)
    assert big["status"] == "skipped_size" and big["structural"] == "pass" and big["tracer"] == "fx"
    assert big["params_by_role"] == row["params_by_role"]  # the structural result is kept
    assert J.check_job("no_such_model_xyz")["status"] == "fail_create"
    for r in (row, big):
        assert r["status"] in STATUSES
        json.dumps(r)


def test_check_job_with_grad_checkpointing_computes_the_same_steps():
    plain = J.check_job("test_vit", steps=2, max_params=None)
    gc = J.check_job("test_vit", steps=2, max_params=None, grad_checkpointing=True)
    assert plain["status"] == gc["status"] == "pass" and gc["grad_checkpointing"] is True
    assert gc["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert "grad checkpointing" in R.checked_at(gc) and "gradient checkpointing" in R.check_settings([gc])
    assert J._enable_grad_checkpointing(torch.nn.Linear(2, 2)).startswith("not supported")


def test_check_job_never_runs_what_cannot_fit(monkeypatch):
    n = 2**30  # 13 GiB at FLOOR_BYTES per parameter
    assert J.FLOOR_BYTES == 13
    monkeypatch.setenv("NEROFY_WORKER_MAX_MB", "14000")
    assert J.cannot_fit(n, 100.0) is None and "> the 13.7 GB memory guard" in J.cannot_fit(n, 900.0)
    monkeypatch.setenv("NEROFY_WORKER_MAX_MB", "0")  # no guard: nothing is predicted
    assert J.cannot_fit(n, 900.0) is None
    monkeypatch.setenv("NEROFY_WORKER_MAX_MB", "1")
    row = J.check_job("test_resnet", steps=1, max_params=None)
    assert row["status"] == "oom" and row["error"].startswith("not run: needs at least")
    assert row["structural"] == "pass" and row["tracer"] == "fx" and "loss" not in row
    json.dumps(row)


# ---------------------------------------------------------------------------------------------
# the pool, through the CLI
# ---------------------------------------------------------------------------------------------
def test_zoo_isolates_timeouts_crashes_oom_and_resumes(tmp_path, zoo_models):
    out = tmp_path / "zoo.jsonl"
    m = zoo_models
    names = [f"{m}:{f}" for f in ("ok", "hang", "crash", "hog", "broken", "ok2")]
    runner = CliRunner()
    res = runner.invoke(app, ["zoo", *names, "--out", str(out), "--jobs", "2", "--timeout", "30",
                              "--max-mem", "1500", "--steps", "1"])
    assert res.exit_code == 0, (res.stderr, res.exception)
    rows = {r["name"]: r for r in _rows(out)}
    assert len(rows) == len(names)  # never a missing row
    got = {n.split(":")[1]: r["status"] for n, r in rows.items()}
    assert got == {"ok": "pass", "ok2": "pass", "hang": "timeout", "crash": "fail_create", "hog": "oom",
                   "broken": "fail_forward"}, {n: r["error"] for n, r in rows.items()}
    assert "worker died (exit code 3) during create" in rows[f"{m}:crash"]["error"]
    assert "memory guard" in rows[f"{m}:hog"]["error"] and rows[f"{m}:hog"]["peak_rss_mb"] > 1500
    assert rows[f"{m}:hog"]["batch"] == 2  # a killed worker's row still says how it was run
    assert rows[f"{m}:hang"]["times"]["total"] >= 30
    # resume: nothing left to do; an existing file without --resume is an error
    res = runner.invoke(app, ["zoo", *names, "--out", str(out), "--resume"])
    assert res.exit_code == 0 and "0 to run" in res.stderr
    res = runner.invoke(app, ["zoo", *names, "--out", str(out)])
    assert res.exit_code == 1 and "--resume" in res.stderr
    # expected statuses
    exp = tmp_path / "expected.json"
    exp.write_text(json.dumps({f"{m}:ok": "pass", f"{m}:broken": "fail_forward"}))
    res = runner.invoke(app, ["zoo", f"{m}:ok", f"{m}:broken", "--out", str(out), "--resume", "--expected", str(exp)])
    assert res.exit_code == 0, res.stderr
    exp.write_text(json.dumps({f"{m}:broken": "pass"}))
    res = runner.invoke(app, ["zoo", f"{m}:broken", "--out", str(out), "--resume", "--expected", str(exp)])
    assert res.exit_code == 1 and "regression" in res.stderr


def test_zoo_structural_and_report(tmp_path):
    out = tmp_path / "s.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["zoo", "test_vit", "test_resnet", "--structural", "--out", str(out), "--jobs", "1"])
    assert res.exit_code == 0, res.stderr
    rows = _rows(out)
    assert sorted(r["name"] for r in rows) == ["test_resnet", "test_vit"]
    assert all(r["status"] == "pass" and r["mode"] == "structural" for r in rows)
    res = runner.invoke(app, ["zoo", "definitely_nothing*", "--structural", "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 1 and "no timm model matches" in res.stderr
    res = runner.invoke(app, ["zoo", "test_vit*", "--list"])
    assert res.exit_code == 0 and "test_vit_relpos" in res.stdout.split()
    exp = tmp_path / "expected.json"
    res = runner.invoke(app, ["report", str(out), "--out-dir", str(tmp_path / "rep"), "--expected-out", str(exp)])
    assert res.exit_code == 0, res.stderr
    assert json.loads(exp.read_text()) == {"test_resnet": "pass", "test_vit": "pass"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Totals" in md and "## Failures by reason" in md and "### vision_transformer" in md
    assert (tmp_path / "rep" / "report.html").read_text().startswith("<!doctype html>")


def test_report_groups_failures_by_reason(tmp_path):
    rows = [
        {"name": "a1", "status": "pass", "family": "a", "tracer": "fx", "total_params": 1e6,
         "constrained_share": 0.99, "times": {"plan": 0.1, "wrap": 0.1, "total": 1}, "peak_rss_mb": 900},
        {"name": "a2", "status": "fail_forward", "family": "a", "error": "RuntimeError: shape '[2, 3]' is invalid for 7"},
        {"name": "b1", "status": "fail_forward", "family": "b", "error": "RuntimeError: shape '[4, 5]' is invalid for 9"},
        {"name": "b2", "status": "skipped_size", "family": "b", "total_params": 9e9},
        {"name": "b3", "status": "timeout", "family": "b", "error": "no result after 300 s (stage: check)"},
    ]
    for r, git in zip(rows, ("abc", "abc", "def", "abc", "def")):  # a sweep over two commits
        r["versions"] = {"torch": "2.14.1", "nerofy_git": git}
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = R.summarize(rows)
    assert s["groups"][0][1] == ["a2", "b1"]  # one reason, two models
    md, html = R.write_report(rows, str(tmp_path), plots=True, sources=[str(path)])
    text = open(md).read()
    assert "| fail_forward | RuntimeError: shape '…' is invalid for N | 2 | a2, b1 |" in text
    assert "skipped_size" in text and "timeout" in text
    assert "Versions: nerofy_git abc (3 rows) / def (2 rows), torch 2.14.1." in text


def test_kill_mid_run_loses_nothing_and_resume_finishes(tmp_path, zoo_models):
    """A real subprocess killed with SIGKILL after its first rows: every line stays whole and
    --resume runs exactly the rest."""
    out = tmp_path / "k.jsonl"
    names = [f"{zoo_models}:{f}" for f in ("ok", "slow", "ok2")] + [f"{zoo_models}:slow"] * 0
    extra = ["test_vit", "test_resnet", "test_convnext"]
    cmd = [sys.executable, "-m", "nerofy", "zoo", *names, *extra, "--structural", "--out", str(out), "--jobs", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    data = out.read_bytes()
    assert data.endswith(b"\n")
    first = _rows(out)
    assert 2 <= len(first) < 6
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = _rows(out)
    assert sorted(r["name"] for r in rows) == sorted(names + extra)  # each exactly once
    assert rows[:len(first)] == first


def test_retry_reruns_size_skipped_models_at_batch_1_with_sampled_verify(tmp_path, zoo_models):
    out = tmp_path / "zoo.jsonl"
    m = zoo_models
    names = [f"{m}:ok", f"{m}:broken"]
    runner = CliRunner()
    res = runner.invoke(app, ["zoo", *names, "--out", str(out), "--jobs", "1", "--max-params", "100", "--steps", "1"])
    assert res.exit_code == 0, res.stderr
    assert {r["name"]: r["status"] for r in _rows(out)} == {f"{m}:ok": "skipped_size", f"{m}:broken": "skipped_size"}
    # bad uses: one clear line each
    res = runner.invoke(app, ["zoo", *names, "--out", str(out), "--retry", "skipped_size"])
    assert res.exit_code == 1 and "--resume" in res.stderr
    res = runner.invoke(app, ["zoo", *names, "--out", str(out), "--resume", "--retry", "skiped"])
    assert res.exit_code == 1 and "unknown status skiped" in res.stderr
    res = runner.invoke(app, ["zoo", *names, "--out", str(out), "--resume", "--order", "big"])
    assert res.exit_code == 1 and "--order" in res.stderr
    res = runner.invoke(app, ["zoo", *names, "--out", str(out), "--resume", "--retry", "skipped_size", "--order", "size",
                              "--max-params", "0", "--batch", "1", "--verify-sample", "--steps", "1", "--jobs", "1"])
    assert res.exit_code == 0, res.stderr
    assert "2 to run" in res.stderr
    rows = _rows(out)
    assert len(rows) == 4  # appended: the latest row of a name supersedes the earlier one
    latest = Z.latest_by_name(rows)
    assert latest[f"{m}:ok"]["status"] == "pass" and latest[f"{m}:broken"]["status"] == "fail_forward"
    ok = latest[f"{m}:ok"]
    assert ok["batch"] == 1 and ok["verify"] == "sample" and ok["input_size"] == [8]
    assert ok["axes"]["ok"] >= 1 and "sampled_out" in ok["axes"]
    md, _ = R.write_report(list(latest.values()), str(tmp_path), plots=False)
    text = open(md).read()
    assert "| 1 x 8, axes sampled |" in text and "2 at batch 1 with axes verified on one parameter" in text
    # nothing left to retry now that the rows pass or fail for a reason
    res = runner.invoke(app, ["zoo", *names, "--out", str(out), "--resume", "--retry", "skipped_size"])
    assert res.exit_code == 0 and "0 to run" in res.stderr


def test_batch_1_falls_back_to_batch_2_only_for_batchnorm_on_single_values(zoo_models):
    m = zoo_models
    row = J.check_job(f"{m}:bn_head", batch=1, max_params=None, steps=1)
    assert row["status"] == "pass" and row["batch"] == 2 and "BatchNorm" in row["note"]
    row = J.check_job(f"{m}:ok", batch=1, max_params=None, steps=1)
    assert row["status"] == "pass" and row["batch"] == 1 and "note" not in row
    row = J.check_job(f"{m}:broken", batch=1, max_params=None, steps=1)
    assert row["status"] == "fail_forward" and row["batch"] == 1


def test_a_killed_gradient_checkpointing_run_says_so():
    import types

    from nerofy_cli import zoo as Z

    w = types.SimpleNamespace(task={"name": "big_vit", "mode": "check", "batch": 1, "grad_checkpointing": True},
                              info={"total_params": 10}, stage="check", started=time.monotonic(), peak_kb=0,
                              proc=types.SimpleNamespace(pid=os.getpid()))
    row = Z.Pool._parent_row(None, w, "oom", "worker RSS 21002 MB > memory guard 21000 MB during check")
    assert row["status"] == "oom" and row["grad_checkpointing"] is True and row["batch"] == 1
    assert row["error"].endswith("during check (with gradient checkpointing)")
