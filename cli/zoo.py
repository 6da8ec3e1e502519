"""The zoo runner: many models, long-lived worker processes, one JSONL row per model.

* Workers (``python -m nerofy_cli.worker``) start once and take model names from a queue: the
  ~3 s import of torch + timm is paid per worker, not per model. A worker is killed and replaced only
  when its model times out (``timeout``), its resident memory passes the guard (``oom``) or it
  crashes; it is recycled (a clean exit) after many models or when it keeps too much memory.
* Rows are appended with one ``write()`` per row and flushed (fsync) at once, so a killed run loses
  nothing already written; ``--resume`` cuts a torn last line and skips the names already present.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .models import CliError

STAGE_STATUS = {"create": "fail_create", "counted": "fail_create", "plan": "fail_plan", "rewrite": "fail_rewrite",
                "check": "fail_forward", "": "fail_create"}


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------
def repair_tail(path: str) -> int:
    """Cut a torn last line (a run killed mid-write) so that appends start on a fresh line.
    Returns the number of bytes removed."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # find the last newline
        pos, chunk = size, 65536
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        return size - keep


def read_rows(path: str) -> list[dict]:
    """Every complete, valid row (torn or foreign lines are skipped)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "name" in row and "status" in row:
                rows.append(row)
    return rows


def latest_by_name(rows: Iterable[dict]) -> dict[str, dict]:
    out = {}
    for r in rows:
        out[r["name"]] = r
    return out


def finite(obj):
    """JSON has no NaN/Infinity: non-finite floats become the strings 'nan', 'inf', '-inf'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


class JsonlWriter:
    """Append-only, one ``os.write`` per row, fsync'd: a kill never tears an earlier row.

    If the path comes to name another file while the sweep runs (``git stash`` or ``checkout``
    rewrites it as a new file), the writer follows the path and first copies over every row of
    the file it had open that the new one lacks: rows never go to an unlinked file."""

    def __init__(self, path: str):
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        repair_tail(path)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)

    def _follow_path(self) -> None:
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                return
        except FileNotFoundError:
            pass
        old = _read_fd(self.fd).splitlines(keepends=True)
        os.close(self.fd)
        if os.path.exists(self.path):
            repair_tail(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        have = set(_read_fd(self.fd).splitlines(keepends=True))
        lost = [line for line in old if line.endswith(b"\n") and line not in have]
        if lost:
            os.write(self.fd, b"".join(lost))
            os.fsync(self.fd)
        print(f"nerofy zoo: {self.path} was replaced while running; continuing in the new file "
              f"({len(lost)} rows copied over from the old one)", file=sys.stderr)

    def write(self, row: dict) -> None:
        self._follow_path()
        data = (json.dumps(finite(row), default=str) + "\n").encode()
        n = os.write(self.fd, data)
        while n < len(data):  # regular files write everything at once; be safe anyway
            data = data[n:]
            n = os.write(self.fd, data)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_fd(fd: int) -> bytes:
    chunks, off = [], 0
    while chunk := os.pread(fd, 1 << 20, off):
        chunks.append(chunk)
        off += len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# selecting models
# ---------------------------------------------------------------------------------------------
def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise CliError(f"--shard wants i/N with 0 <= i < N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise CliError(f"--shard wants i/N with 0 <= i < N (e.g. 0/4), got {text!r}")
    return i, n


def select(all_names: list[str], patterns: list[str] | None = None, exclude: list[str] | None = None,
           shard: tuple[int, int] | None = None) -> list[str]:
    """Names matching any pattern (fnmatch globs; a bare word without wildcards matches itself or,
    failing that, names containing it), minus ``exclude``, then shard ``i/N`` (every N-th name of the
    sorted list, starting at i). ``package.module:factory`` patterns are taken as they are (the
    user's own models, after the timm names)."""
    names = sorted(set(all_names))
    # 'package.module:factory' is a user's model; 'torchvision:vit*' (a prefix the names carry) is a pattern
    prefixes = {"timm"} | {n.split(":", 1)[0] for n in names if ":" in n}
    custom = [p for p in patterns or [] if ":" in p and p.split(":", 1)[0] not in prefixes]
    patterns = [p[len("timm:"):] if p.startswith("timm:") else p for p in patterns or [] if p not in custom]
    if custom and not patterns:
        names = []
    if patterns:
        keep = []
        for n in names:
            for p in patterns:
                if any(c in p for c in "*?["):
                    if fnmatch.fnmatchcase(n, p):
                        keep.append(n)
                        break
                elif n == p:
                    keep.append(n)
                    break
        bare = [p for p in patterns if not any(c in p for c in "*?[") and p not in names]
        for p in bare:  # a bare word that names no model: substring match
            keep += [n for n in names if p in n and n not in keep]
        names = sorted(set(keep))
    if exclude:
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) or n == p for p in exclude)]
    names = names + [c for c in custom if c not in names]
    if shard:
        i, k = shard
        names = names[i::k]
    return names


# ---------------------------------------------------------------------------------------------
# the worker pool
# ---------------------------------------------------------------------------------------------
def _proc_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _tree_rss_kb(pid: int) -> int:
    """RSS of the worker plus any children it started (a model could spawn processes)."""
    total = _proc_kb(pid, "VmRSS") or 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for c in f.read().split():
                total += _tree_rss_kb(int(c))
    except OSError:
        pass
    return total


@dataclass
class _Worker:
    proc: subprocess.Popen
    log: str
    buf: bytes = b""
    ready: bool = False
    task: dict | None = None
    started: float = 0.0
    stage: str = ""
    info: dict = field(default_factory=dict)
    done: int = 0
    peak_kb: int = 0
    spawned: float = field(default_factory=time.monotonic)


def _tail(path: str, n: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4000))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-n:])
    except OSError:
        return ""


class Pool:
    """Run ``tasks`` on ``jobs`` long-lived workers; ``on_row(row)`` for every finished model."""

    def __init__(self, jobs: int = 1, timeout: float = 300.0, max_mem_mb: float = 0.0, threads: int = 0,
                 recycle_after: int = 200, recycle_mb: float = 0.0, python: str | None = None,
                 log_dir: str | None = None, start_timeout: float = 600.0):
        self.jobs = max(1, jobs)
        self.start_timeout = start_timeout
        self.timeout = timeout
        self.max_mem_mb = max_mem_mb
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.jobs)
        self.recycle_after = recycle_after
        self.recycle_mb = recycle_mb or (max_mem_mb / 2 if max_mem_mb else 4096)
        self.python = python or sys.executable
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="nerofy-zoo-")
        self.sel = selectors.DefaultSelector()
        self.workers: list[_Worker] = []
        self.started_workers = 0

    # -- workers ---------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        env = dict(os.environ)
        env["NEROFY_WORKER_THREADS"] = str(self.threads)
        env["NEROFY_WORKER_MAX_MB"] = str(int(self.max_mem_mb))
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        env["PYTHONUNBUFFERED"] = "1"
        self.started_workers += 1
        log = os.path.join(self.log_dir, f"worker-{self.started_workers}.log")
        with open(log, "wb") as errf:
            proc = subprocess.Popen([self.python, "-m", "nerofy_cli.worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=errf, env=env, start_new_session=True)
        os.set_blocking(proc.stdout.fileno(), False)
        w = _Worker(proc, log)
        self.sel.register(proc.stdout, selectors.EVENT_READ, w)
        self.workers.append(w)
        return w

    def _kill(self, w: _Worker) -> None:
        try:
            self.sel.unregister(w.proc.stdout)
        except (KeyError, ValueError):
            pass
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            w.proc.kill()
        except ProcessLookupError:
            pass
        w.proc.wait()
        for s in (w.proc.stdin, w.proc.stdout):
            try:
                s.close()
            except Exception:
                pass
        if w in self.workers:
            self.workers.remove(w)
        try:
            os.unlink(w.log)
        except OSError:
            pass

    def _retire(self, w: _Worker) -> None:
        """A clean exit: close stdin, wait briefly, then kill."""
        try:
            w.proc.stdin.close()
            w.proc.wait(timeout=10)
        except Exception:
            pass
        self._kill(w)

    def _send(self, w: _Worker, task: dict) -> None:
        w.task, w.started, w.stage, w.info, w.peak_kb = task, time.monotonic(), "", {}, 0
        w.proc.stdin.write((json.dumps(task) + "\n").encode())
        w.proc.stdin.flush()

    # -- rows made by the parent -------------------------------------------------------------
    def _parent_row(self, w: _Worker, status: str, error: str) -> dict:
        from .jobs import base_row

        task = w.task or {}
        row = base_row(task.get("name", "?"), task.get("mode", "check"))
        if task.get("grad_checkpointing"):  # say how the killed run was set up: the retry's own settings
            row["grad_checkpointing"] = True
            error += " (with gradient checkpointing)"
        if task.get("mode", "check") == "check" and task.get("batch"):
            row["batch"] = task["batch"]
        row["status"], row["error"] = status, error[:400]
        row["total_params"] = w.info.get("total_params", 0)
        row["stage"] = w.stage
        row["times"] = {"total": round(time.monotonic() - w.started, 2)}
        peak = max(w.peak_kb, _proc_kb(w.proc.pid, "VmHWM") or 0)
        row["peak_rss_mb"], row["peak_source"] = round(peak / 1024, 1), "VmHWM (parent)"
        return row

    # -- the loop ------------------------------------------------------------------------------
    def run(self, tasks: list[dict], on_row: Callable[[dict], None],
            on_start: Callable[[str], None] | None = None) -> None:
        queue = deque(tasks)
        n_workers = min(self.jobs, len(queue))
        for _ in range(n_workers):
            self._spawn()
        try:
            while queue or any(w.task for w in self.workers):
                # hand out work
                for w in list(self.workers):
                    if w.ready and w.task is None:
                        if not queue:
                            self._retire(w)
                            continue
                        t = queue.popleft()
                        self._send(w, t)
                        if on_start:
                            on_start(t["name"])
                # keep enough workers alive
                while len(self.workers) < min(self.jobs, len(queue) + sum(1 for w in self.workers if w.task)) \
                        and queue:
                    self._spawn()
                for key, _ in self.sel.select(timeout=0.2):
                    self._read(key.data, on_row)
                now = time.monotonic()
                for w in list(self.workers):
                    if w.proc.poll() is not None and w in self.workers:
                        self._read(w, on_row)  # whatever it managed to say
                        if w in self.workers:
                            self._crashed(w, on_row)
                        continue
                    if w.task is None:
                        if not w.ready and now - w.spawned > self.start_timeout:
                            tail = _tail(w.log, 5)
                            self._kill(w)
                            raise CliError(f"a zoo worker did not start within {self.start_timeout:g} s: "
                                           f"{tail or 'no output'}")
                        continue
                    rss = _tree_rss_kb(w.proc.pid)
                    w.peak_kb = max(w.peak_kb, rss)
                    if self.max_mem_mb and rss / 1024 > self.max_mem_mb:
                        on_row(self._parent_row(w, "oom", f"worker RSS {rss / 1024:.0f} MB > memory guard "
                                                f"{self.max_mem_mb:.0f} MB during {w.stage or 'start'}"))
                        self._kill(w)
                    elif self.timeout and now - w.started > self.timeout:
                        on_row(self._parent_row(w, "timeout", f"no result after {self.timeout:g} s "
                                                f"(stage: {w.stage or 'start'})"))
                        self._kill(w)
        finally:
            for w in list(self.workers):
                self._kill(w)

    def _read(self, w: _Worker, on_row) -> None:
        try:
            data = w.proc.stdout.read()
        except (OSError, ValueError):
            data = None
        if data:
            w.buf += data
        while b"\n" in w.buf:
            line, w.buf = w.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("event")
            if ev == "ready":
                w.ready = True
            elif ev == "stage":
                w.stage = msg.get("stage", "")
                w.info.update({k: v for k, v in msg.items() if k not in ("event", "stage")})
            elif ev == "row" and w.task is not None:
                row = msg["row"]
                on_row(row)
                w.task = None
                w.done += 1
                if w.done >= self.recycle_after or msg.get("rss_mb", 0) > self.recycle_mb:
                    self._retire(w)
                    return

    def _crashed(self, w: _Worker, on_row) -> None:
        rc = w.proc.returncode
        why = f"signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
        if w.task is not None:
            status = "oom" if rc == -signal.SIGKILL else STAGE_STATUS.get(w.stage, "fail_forward")
            tail = _tail(w.log)
            on_row(self._parent_row(w, status, f"worker died ({why}) during {w.stage or 'start'}"
                                    + (f": {tail}" if tail else "")))
        elif not w.ready:
            tail = _tail(w.log, 5)
            self._kill(w)
            raise CliError(f"a zoo worker failed to start ({why}): {tail or 'no output'}")
        self._kill(w)


def default_max_mem_mb(jobs: int) -> float:
    """80% of the memory available now, shared by the workers."""
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) for ln in f}
        avail = info.get("MemAvailable", info.get("MemTotal", 0)) / 1024
    except (OSError, ValueError):
        return 0.0
    return round(0.8 * avail / max(1, jobs))


# ---------------------------------------------------------------------------------------------
# expected statuses (CI)
# ---------------------------------------------------------------------------------------------
def compare_expected(rows: dict[str, dict], expected: dict[str, str]) -> tuple[list[str], list[str]]:
    """(regressions, improvements): a model expected to pass that does not, or any other status change
    (regression unless it now passes)."""
    regress, improve = [], []
    for name, want in sorted(expected.items()):
        row = rows.get(name)
        if row is None:
            regress.append(f"{name}: expected {want}, no row")
            continue
        got = row["status"]
        if got == want:
            continue
        line = f"{name}: expected {want}, got {got}" + (f" ({row.get('error', '')[:160]})" if row.get("error") else "")
        (improve if got == "pass" else regress).append(line)
    return regress, improve
