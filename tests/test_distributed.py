"""Distributed training of wrapped models (issue item 4 / docs/ecosystem.md "Distributed").

Two gloo processes on 127.0.0.1 (a free port, bounded time), CPU only:

* DDP stays in sync (parameters and Nero state identical on both ranks) and matches a
  single-process run on the same global batch;
* FSDP2 (``fully_shard``) trains with Nero's per-neuron state sharded with the weights (each rank
  holds the state of its own neurons only) and matches the single-process run;
* torch.distributed.checkpoint (get_state_dict / dcp.save / dcp.load / set_state_dict, flattened
  optimizer state keyed by parameter name) of FSDP2 + Nero halfway resumes to the uninterrupted run.

This file is also the worker: ``python tests/test_distributed.py MODE RANK WORLD PORT OUT``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

STEPS = 4
GLOBAL_BATCH = 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.head(self.ln(F.gelu(self.fc(h))))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)


def _wrapped(seed=0, **kw):
    import nerofy

    torch.manual_seed(seed)
    return nerofy.wrap(Net(), **kw)


def _train(model, opt, x, y, steps=STEPS):
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _sharded(seed=0, **kw):
    """A wrapped Net under FSDP2. fully_shard replaces every parameter by a sharded DTensor one, so
    the Nero from wrap holds the old tensors: build it again from the model (docs/frameworks.md)."""
    import nerofy
    from torch.distributed.fsdp import fully_shard

    m, _ = _wrapped(seed)
    for sub in (m.conv, m.fc, m.head):
        fully_shard(sub)
    fully_shard(m)
    return m, nerofy.Nero(nerofy.param_groups(m), **kw)


# ---------------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------------
def _worker(mode: str, rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    x, y = _data()
    per = GLOBAL_BATCH // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    res = {}
    if mode in ("ddp", "all"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        m, opt = _wrapped()  # Nero's default route (fused kernel where it can)
        ddp = DDP(m)
        _train(ddp, opt, xs, ys)
        res["ddp_params"] = {n: p.detach().clone() for n, p in m.named_parameters()}
        res["ddp_v"] = [opt.state[p]["v"].clone() for g in opt.param_groups for p in g["params"]]
    if mode in ("fsdp", "all", "fsdp_foreach"):
        m, opt = _sharded(fused=False if mode == "fsdp_foreach" else None)
        res["fsdp_losses"] = _train(m, opt, xs, ys)
        res["fsdp_params"] = {n: p.full_tensor().detach().clone() for n, p in m.named_parameters()}
        res["fsdp_state"] = {n: (tuple(p.shape), tuple(opt.state[p]["v"].shape),
                                 tuple(opt.state[p]["v"].to_local().shape), str(opt.state[p]["v"].placements))
                             for n, p in m.named_parameters()}
        res["fsdp_scale"] = {n: opt.state[p]["scale"] for n, p in m.named_parameters()}
        res["fsdp_v"] = {n: opt.state[p]["v"].full_tensor().clone() for n, p in m.named_parameters()}
    if mode in ("dcp", "all"):
        # torch.distributed.checkpoint of the FSDP2 model and Nero halfway, resumed in a fresh
        # (differently initialised) pair: DCP keys optimizer state by parameter name
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        m1, opt1 = _sharded()
        _train(m1, opt1, xs, ys, STEPS // 2)
        msd, osd = get_state_dict(m1, opt1, options=flat)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(out, "dcp"))
        m2, opt2 = _sharded(seed=7)
        msd2, osd2 = get_state_dict(m2, opt2, options=flat)
        dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=os.path.join(out, "dcp"))
        set_state_dict(m2, opt2, model_state_dict=msd2, optim_state_dict=osd2, options=flat)
        _train(m2, opt2, xs, ys, STEPS - STEPS // 2)
        res["dcp_params"] = {n: p.full_tensor().detach().clone() for n, p in m2.named_parameters()}
        res["dcp_v"] = {n: opt2.state[p]["v"].full_tensor().clone() for n, p in m2.named_parameters()}
        res["dcp_step"] = {n: int(opt2.state[p]["step"]) for n, p in m2.named_parameters()}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the launcher
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, tmp_path: Path, world: int = 2, timeout: float = 120.0) -> list[dict]:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(r), str(world), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            # one rank dying (e.g. a crash in a kernel) leaves the other waiting in a collective
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outs = [p.communicate()[0].decode(errors="replace")[-2000:] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{outs[r]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _single(**kw):
    m, opt = _wrapped(**kw)
    x, y = _data()
    _train(m, opt, x, y)
    return {n: p.detach() for n, p in m.named_parameters()}, opt


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch("all", tmp_path_factory.mktemp("dist"))


def test_ddp_ranks_stay_in_sync(two_ranks):
    r0, r1 = two_ranks
    for n, p in r0["ddp_params"].items():
        assert torch.equal(p, r1["ddp_params"][n]), n
    for a, b in zip(r0["ddp_v"], r1["ddp_v"]):
        assert torch.equal(a, b)


def test_ddp_matches_single_process_on_the_global_batch(two_ranks):
    ref, opt = _single()
    for n, p in two_ranks[0]["ddp_params"].items():
        torch.testing.assert_close(p, ref[n], rtol=1e-4, atol=2e-5, msg=n)
    ref_v = [opt.state[p]["v"] for g in opt.param_groups for p in g["params"]]
    for a, b in zip(two_ranks[0]["ddp_v"], ref_v):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-9)


def test_fsdp2_state_is_local_to_each_shard(two_ranks):
    for r in two_ranks:
        for n, (shape, v_shape, v_local, placements) in r["fsdp_state"].items():
            assert "Shard(dim=0)" in placements, (n, placements)
            if "parametrizations" in n:  # one state value per neuron, sharded like the neurons
                assert v_shape == (shape[0],) + (1,) * (len(shape) - 1), n
            else:
                assert v_shape == shape, n
            assert v_local[0] == v_shape[0] // 2, n


def test_fsdp2_trains_and_stays_balanced(two_ranks):
    import nerofy
    from nerofy.layout import NeuronLayout

    for r in two_ranks:
        assert r["fsdp_losses"][-1] < r["fsdp_losses"][0]
        for n, p in r["fsdp_params"].items():
            assert torch.isfinite(p).all(), n
            if "parametrizations" in n:  # the stored tensor is re-projected by Nero after each step
                lay = NeuronLayout((0,))
                torch.testing.assert_close(lay.project(p), p, rtol=0, atol=1e-5)
    for n, p in two_ranks[0]["fsdp_params"].items():
        assert torch.equal(p, two_ranks[1]["fsdp_params"][n])


def test_fsdp2_matches_single_process(two_ranks):
    ref, _ = _single(fused=False)
    for r in two_ranks:
        for n, p in r["fsdp_params"].items():
            torch.testing.assert_close(p, ref[n], rtol=1e-4, atol=2e-5, msg=n)


def test_dcp_resume_of_fsdp2_and_nero_equals_the_uninterrupted_run(two_ranks):
    for r in two_ranks:
        for n, p in r["dcp_params"].items():
            assert torch.equal(p, r["fsdp_params"][n]), n
            assert torch.equal(r["dcp_v"][n], r["fsdp_v"][n]), n
            assert r["dcp_step"][n] == STEPS, n


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
