"""``nerofy``: convert a model, print its plan, check the timm zoo, render a report.

Thin commands over the library (:mod:`nerofy`) and the helpers next to this file
(:mod:`.models`, :mod:`.jobs`, :mod:`.zoo`, :mod:`.report`). Errors print one red line on stderr
and exit non-zero; ``NEROFY_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .models import CliError

app = typer.Typer(
    name="nerofy",
    help="Turn PyTorch models into balanced networks trained by Nero.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

STATUS_STYLE = {"pass": "green", "skipped_size": "yellow", "timeout": "magenta", "oom": "magenta"}


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def debug() -> bool:
    return os.environ.get("NEROFY_DEBUG", "") not in ("", "0", "false", "no")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show the library's info messages")) -> None:
    """Turn PyTorch models into balanced networks trained by Nero."""
    _route_library_logs(logging.DEBUG if debug() else logging.INFO if verbose else logging.WARNING)


def _route_library_logs(level: int) -> None:
    """The library logs through `logging` (logger "nerofy"); the CLI shows it as rich lines on stderr."""
    from rich.logging import RichHandler

    logger = logging.getLogger("nerofy")
    for h in [h for h in logger.handlers if getattr(h, "_nerofy_cli", False)]:
        logger.removeHandler(h)
    handler = RichHandler(console=_err_console(), show_time=False, show_path=False, markup=False,
                          rich_tracebacks=debug())
    handler._nerofy_cli = True
    handler.setLevel(level)
    logger.addHandler(handler)
    if level < logging.WARNING:  # -v / NEROFY_DEBUG: let info (debug) records through the logger too
        logger.setLevel(level)
    # propagation stays on: a host application's (or pytest's) handlers keep seeing nerofy's records;
    # the root logger has no handler in a plain CLI run, so nothing is printed twice


def _one_line(e: BaseException) -> str:
    if isinstance(e, CliError):
        return str(e)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def guarded(fn):
    """Any exception -> one red line on stderr and exit 1 (traceback with NEROFY_DEBUG=1)."""

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _err_console().print("[red]interrupted[/red]")
            raise typer.Exit(130)
        except Exception as e:
            if debug():
                raise
            _err_console().print(f"[red]error: {escape(_one_line(e))}[/red]")
            raise typer.Exit(1)

    return inner


def _fmt_n(n: float) -> str:
    n = float(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def plan_table(plan, max_reason: int = 70) -> Table:
    t = Table(title=f"plan ({plan.frontend})", show_lines=False, header_style="bold")
    for h in plan.HEADER:
        t.add_column(h, overflow="fold", no_wrap=h in ("shape", "role", "axes", "fan-in"))
    style = {"neuron": "green", "frozen": "dim", "free": "yellow"}
    for row in plan.rows():
        row = row[:-1] + (row[-1][:max_reason],)
        t.add_row(*(escape(c) for c in row), style=style.get(row[2]))
    return t


def _print_plan(plan, max_reason: int = 70) -> None:
    """A rich table on a terminal; the library's plain, greppable table when piped."""
    out = _out()
    if out.is_terminal:
        out.print(plan_table(plan, max_reason))
    else:
        text = plan.table(max_reason=max_reason)
        sys.stdout.write(text.split("\n\n")[0] + "\n\n")


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------
@app.command()
@guarded
def convert(
    model: str = typer.Argument(..., help="timm name (resnet50, timm:resnet50), torchvision:NAME, "
                                          "transformers:NAME (as zoo rows name them) or package.module:factory"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c",
                                             help="local state_dict to load (plain, nerofy-wrapped, or under "
                                                  "'state_dict'/'model')"),
    strict: bool = typer.Option(True, "--strict/--no-strict", help="every checkpoint key must fit the model"),
    keep: Optional[str] = typer.Option(None, "--keep", help="'function' (the default with --checkpoint): the "
                                                            "wrapped model computes what the loaded one did, each "
                                                            "neuron keeping its trained norm; 'direction' (the "
                                                            "default otherwise): the paper's projection"),
    arg: Optional[List[str]] = typer.Option(None, "--arg", "-a", help="factory keyword, key=value (repeatable), "
                                                                      "e.g. --arg num_classes=10"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="one sample's shape, e.g. 3,224,224 "
                                                                        "(default: the model's own)"),
    steps: int = typer.Option(3, "--steps", min=1, help="Nero steps in the check"),
    lr: float = typer.Option(0.01, "--lr", help="Nero learning rate (a turning angle in radians)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="verify neuron axes numerically"),
    show_plan: bool = typer.Option(False, "--show-plan", help="print the plan table"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="save the converted state_dict here"),
    bake: bool = typer.Option(False, "--bake", help="with --output: save a plain state_dict (original keys, "
                                                    "balanced weights) instead of the wrapped one"),
    force: bool = typer.Option(False, "--force", help="with --output: save even when the check fails"),
    as_json: bool = typer.Option(False, "--json", help="write the result as JSON on stdout (progress on stderr)"),
):
    """Create MODEL (no weight download), plan, wrap and check it; print a summary."""
    import copy

    import torch

    import nerofy

    from . import jobs
    from . import models as M

    if bake and not output:
        raise CliError("--bake needs --output PATH")
    keep = keep or ("function" if checkpoint else "direction")
    if keep not in nerofy.KEEP_MODES:
        raise CliError(f"--keep {keep}: choose from {', '.join(nerofy.KEEP_MODES)}")
    err = _err_console()
    say = (lambda msg: err.print(f"[dim]{escape(msg)}[/dim]"))
    source = jobs.reset_peak()
    base = jobs.rss_mb()
    times: dict[str, float] = {}
    t = time.perf_counter()
    kind, name = M.parse_spec(model)
    if kind == "timm":
        M.check_timm_name(name)  # an unknown name fails here, before any progress line
        t = time.perf_counter()
    say(f"creating {model} (random weights, nothing downloaded)")
    torch.manual_seed(0)
    m = M.create(model, kwargs=M.parse_kwargs(arg))
    times["create"] = time.perf_counter() - t
    ck = None
    if checkpoint:
        t = time.perf_counter()
        say(f"loading {checkpoint}")
        ck = M.load_checkpoint(m, checkpoint, strict=strict)
        times["load"] = time.perf_counter() - t
    size = M.parse_size(input_size)
    inputs, plan_inputs, loss_fn = _check_inputs(model, m, size)
    say(f"planning ({M.count_params(m):,} parameters)")
    t = time.perf_counter()
    plan = nerofy.plan(m, plan_inputs)
    times["plan"] = time.perf_counter() - t
    work = copy.deepcopy(m) if output else m
    say(f"checking: {_describe(inputs)}, forward, backward, {steps} Nero steps")
    from nerofy.check import check_model

    r = check_model(work, inputs, steps=steps, lr=lr, verify=verify, plan=plan, loss_fn=loss_fn, keep=keep)
    times.update({k: v for k, v in r.times.items() if k != "plan"})  # the plan was made above
    del work
    saved = None
    if output:
        if r.status != "pass" and not force:
            raise CliError(f"check failed ({r.status}: {r.error}); not saving {output} (use --force to save anyway)")
        m, _ = nerofy.wrap(m, lr=lr, plan=plan, keep=keep)
        if bake:
            nerofy.bake(m)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        torch.save(m.state_dict(), output)
        saved = {"path": output, "baked": bake, "bytes": os.path.getsize(output)}
        say(f"saved {'plain (baked)' if bake else 'wrapped'} state_dict to {output}")
    peak = jobs.peak_mb(source)
    result = r.to_dict()
    batch, sample_shape = _input_info(inputs)
    result.update({
        "model": model, "input_size": sample_shape, "batch": batch, "steps": steps,
        "times": {k: round(v, 4) for k, v in times.items()}, "peak_rss_mb": round(peak, 1),
        "start_rss_mb": round(base, 1), "peak_source": source, "checkpoint": ck, "output": saved, "keep": keep,
        "attempts": [list(a) for a in plan.attempts], "versions": jobs.versions(),
    })
    if as_json:
        if show_plan:
            result["plan"] = plan.to_dict()
        from .zoo import finite

        sys.stdout.write(json.dumps(finite(result), indent=2, default=str) + "\n")
    else:
        if show_plan:
            _print_plan(plan)
        _print_summary(result, plan)
    if r.status != "pass":
        raise typer.Exit(1)


def _check_inputs(spec: str, model, size):
    """(inputs, inputs to plan with or None, loss): a timm model plans at its own input size; a
    torchvision/transformers model from nerofy's list brings its inputs (images and targets,
    token ids ...) and loss."""
    from nerofy.check import default_loss

    from . import models as M

    src = M.source_spec(spec)
    if src is not None:
        if size:
            raise CliError(f"{spec} brings its own example inputs: --input-size is not supported for it")
        # a transformers type's inputs come from the model itself (nerofy.example_inputs)
        inputs = src.inputs(2, 0, model=model) if src.source == "transformers" else src.inputs(2, 0)
        return inputs, inputs, src.loss
    inputs = M.make_inputs(model, size)
    own_size = M.input_size(model) is not None and size is None
    return inputs, None if own_size else inputs, default_loss


def _input_info(inputs) -> tuple[int | None, list[int] | None]:
    """(batch, one sample's shape) of the check's first input: a batched tensor, or a list of
    samples (torchvision detectors take a list of images), or a dict's first tensor (keyword inputs
    of a transformers model: its main input comes first)."""
    if isinstance(inputs, dict):
        inputs = next((v for v in inputs.values() if hasattr(v, "shape")), None)
    x = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
    if isinstance(x, (list, tuple)):
        return len(x), (list(x[0].shape) if x and hasattr(x[0], "shape") else None)
    if hasattr(x, "shape") and x.dim() > 0:
        return int(x.shape[0]), list(x.shape[1:])
    return None, None


def _describe(inputs) -> str:
    b, shape = _input_info(inputs)
    return f"{b} samples of {tuple(shape)}" if shape is not None else "the example inputs"


def _print_summary(res: dict, plan) -> None:
    out = _out()
    st = res["status"]
    colour = STATUS_STYLE.get(st, "red")
    out.print(f"[bold]{escape(res['model'])}[/bold]: [{colour}]{st}[/{colour}]"
              + (f"  [red]{escape(res['error'])}[/red]" if res["error"] else ""))
    s = plan.summary()
    t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for c, j in (("role", "left"), ("tensors", "right"), ("parameters", "right"), ("share", "right")):
        t.add_column(c, justify=j)
    total = s["total_params"] or 1
    for role, n in s["tensors"].items():
        if n:
            t.add_row(role, str(n), f"{s['params'][role]:,}", f"{s['params'][role] / total:.1%}")
    t.add_row("[bold]total[/bold]", str(sum(s["tensors"].values())), f"{s['total_params']:,}", "")
    out.print(t)
    fails = [f"{f}: {m}" for f, m in plan.attempts if m != "ok" and f != "note"]
    out.print(f"tracer: [bold]{plan.frontend}[/bold]" + (f" (after {escape('; '.join(fails))})" if fails else ""))
    out.print(f"constrained: [bold]{s['constrained_share']:.1%}[/bold] of trainable parameters "
              f"(zero-mean neurons and table vectors, norm = their fixed gain)")
    out.print(escape(plan.chain_note()))
    ax = res.get("axes") or {}
    if ax:
        out.print("axes verified: " + ", ".join(f"{k} {v}" for k, v in ax.items()))
    if res.get("loss"):
        out.print("loss: " + " -> ".join(f"{x:.4g}" for x in res["loss"])
                  + f"; max constraint error {res['max_constraint_error']:.1e}")
    out.print("times: " + ", ".join(f"{k} {_fmt_s(v)}" for k, v in res["times"].items()))
    out.print(f"peak memory: {res['peak_rss_mb']:.0f} MB resident ({res['peak_rss_mb'] - res['start_rss_mb']:.0f} MB "
              f"above the start; {res['peak_source']})")
    if res.get("keep") == "function":
        ch = res.get("wrap_output_change")
        out.print("kept: the trained function (each neuron's norm is its fixed gain; centring relaxed where a neuron "
                  "has a mean)" + (f"; outputs at wrap moved by {ch:.1e} (relative)" if ch is not None else ""))
    if res.get("checkpoint"):
        c = res["checkpoint"]
        out.print(f"checkpoint: {escape(c['path'])} ({c['tensors']} tensors"
                  + (f", {c['wrapped_keys']} nerofy-wrapped" if c["wrapped_keys"] else "")
                  + (f", {len(c['missing'])} missing" if c["missing"] else "")
                  + (f", {len(c['unexpected'])} unexpected" if c["unexpected"] else "") + ")")
    ws = res.get("warnings") or []
    if ws:
        out.print(f"[yellow]warnings ({len(ws)}):[/yellow]")
        for w in ws[:10]:
            out.print(f"  [yellow]-[/yellow] {escape(w[:300])}")
        if len(ws) > 10:
            out.print(f"  ... and {len(ws) - 10} more (--json lists them all)")
    if res.get("output"):
        o = res["output"]
        out.print(f"saved: {escape(o['path'])} ({'plain, baked' if o['baked'] else 'wrapped'}; "
                  f"{o['bytes'] / 1e6:.1f} MB)")


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------
@app.command("plan")
@guarded
def plan_cmd(
    model: str = typer.Argument(..., help="timm name, torchvision:NAME, transformers:NAME or package.module:factory"),
    arg: Optional[List[str]] = typer.Option(None, "--arg", "-a", help="factory keyword, key=value (repeatable)"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="one sample's shape, e.g. 3,224,224"),
    as_json: bool = typer.Option(False, "--json", help="the plan as JSON on stdout"),
    reason_width: int = typer.Option(70, "--reason-width", help="truncate reasons in the table"),
):
    """Print MODEL's plan: every parameter's role, neuron axes, fan-in and reason (built on meta: no memory)."""
    import nerofy

    from . import models as M

    kwargs = M.parse_kwargs(arg)
    size = M.parse_size(input_size)
    if M.source_spec(model) is not None:  # small configs, real inputs (detectors trace one real forward)
        m = M.create(model, kwargs=kwargs)
        _, inputs, _ = _check_inputs(model, m, size)
    else:
        try:
            m = M.create(model, meta=True, kwargs=kwargs)
        except CliError:
            raise
        except Exception:  # some factories cannot build on meta
            m = M.create(model, kwargs=kwargs)
        inputs = None
        if size or M.input_size(m) is None:
            inputs = M.make_inputs(m, size)
    p = nerofy.plan(m, inputs)
    if as_json:
        sys.stdout.write(p.to_json() + "\n")
    else:
        out = _out()
        _print_plan(p, reason_width)
        s = p.summary()
        out.print(f"tracer: {p.frontend}; constrained: {s['constrained_share']:.1%} of trainable parameters; "
                  + ", ".join(f"{r}: {c}" for r, c in s["tensors"].items() if c))
        out.print(escape(p.chain_note()))
        for w in p.warnings:
            out.print(f"[yellow]warning:[/yellow] {escape(w)}")


# ---------------------------------------------------------------------------------------------
# zoo
# ---------------------------------------------------------------------------------------------
@app.command()
@guarded
def zoo(
    patterns: Optional[List[str]] = typer.Argument(None, help="model names or globs (default: all of "
                                                              "timm.list_models())"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="JSONL file (default: model_zoo_checks/"
                                                                 "check.jsonl, or structural.jsonl)"),
    structural: bool = typer.Option(False, "--structural", help="trace + plan + rewrite on meta only (every model, "
                                                                "no memory, no compute)"),
    resume: bool = typer.Option(False, "--resume", help="skip models already in the output file"),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/N: this run's share (0 <= i < N) of the sorted names"),
    jobs: int = typer.Option(0, "--jobs", "-j", help="worker processes (default: CPU cores)"),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads per worker (default: CPU cores / jobs)"),
    timeout: float = typer.Option(300.0, "--timeout", help="seconds per model before its worker is killed"),
    max_params: float = typer.Option(60e6, "--max-params", help="larger models get the structural check and "
                                                                 "'skipped_size' (0: no limit)"),
    max_mem: float = typer.Option(0, "--max-mem", help="MB per worker before it is killed as 'oom' "
                                                       "(default: 80% of available memory / jobs)"),
    steps: int = typer.Option(3, "--steps", min=1, help="Nero steps per model (full check)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="verify neuron axes (full check)"),
    verify_sample: bool = typer.Option(False, "--verify-sample", help="verify one parameter per distinct (module "
                                                                      "type, shape, axes): for big models"),
    batch: int = typer.Option(2, "--batch", min=1, help="samples per check batch, at the model's own input size"),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing",
                                            help="timm models that support it recompute activations in backward "
                                                 "(set_grad_checkpointing): for models whose activations do not fit"),
    retry: Optional[str] = typer.Option(None, "--retry", help="with --resume: run again the models whose last row "
                                                               "has one of these statuses (comma-separated)"),
    order: str = typer.Option("name", "--order", help="name, or size: smallest first by the parameter counts "
                                                      "already in the output file (for --retry)"),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", "-x", help="names or globs to leave out"),
    limit: int = typer.Option(0, "--limit", help="only the first N selected models (after sharding)"),
    expected: Optional[str] = typer.Option(None, "--expected", help="JSON name -> status: exit 1 on a regression"),
    list_only: bool = typer.Option(False, "--list", help="print the selected names and exit"),
    source: str = typer.Option("timm", "--source", help="model zoo: timm, torchvision or transformers "
                                                         "(built from code or configs, nothing downloaded)"),
):
    """Check many models (timm by default), each in an isolated worker process; one JSONL row per model."""
    from . import models as M
    from . import zoo as Z

    if source == "timm":
        universe = M.timm_names()
    else:
        from . import sources as S

        if source not in S.SOURCES:
            raise CliError(f"unknown --source {source!r}; choose from timm, {', '.join(S.SOURCES)}")
        universe = [f"{source}:{n}" for n in S.names(source)]

        def prefixed(ps):  # the source's names carry its prefix; the user may leave it out
            return [p if p.startswith(f"{source}:") else f"{source}:{p}" for p in ps or []] or None

        patterns, exclude = prefixed(patterns), prefixed(exclude)
        os.environ["NEROFY_WORKER_PREIMPORT"] = "nerofy_cli.sources,torchvision" + \
            (",transformers" if source == "transformers" else "")
    names = Z.select(universe, patterns, exclude, Z.parse_shard(shard))
    if source != "timm":  # select() passes 'pkg.mod:factory' names through; here only the source's own
        known = set(universe)
        names = [n for n in names if n in known]
    if patterns and not names:
        near = sorted({c for p in patterns for c in M.closest(p.strip("*"), universe, 3)})
        raise CliError(f"no {source} model matches {' '.join(patterns)}" + (f"; closest: {', '.join(near)}" if near else ""))
    if limit:
        names = names[:limit]
    if list_only:
        sys.stdout.write("\n".join(names) + ("\n" if names else ""))
        return
    suffix = "" if source == "timm" else f"_{source}"
    path = out or os.path.join("model_zoo_checks", ("structural" if structural else "check") + suffix + ".jsonl")
    mode = "structural" if structural else "check"
    err = _err_console()
    if order not in ("name", "size"):
        raise CliError(f"--order wants name or size, got {order!r}")
    if retry and not resume:
        raise CliError("--retry re-runs rows of an existing file: add --resume")
    retry_set = {s.strip() for s in (retry or "").split(",") if s.strip()}
    from nerofy.check import STATUSES

    if retry_set - set(STATUSES):
        raise CliError(f"--retry: unknown status {', '.join(sorted(retry_set - set(STATUSES)))}; "
                       f"choose from {', '.join(STATUSES)}")
    done: set[str] = set()
    prev: dict[str, dict] = {}
    if resume:
        cut = Z.repair_tail(path)
        prev = Z.latest_by_name(r for r in Z.read_rows(path) if r.get("mode", mode) == mode)
        done = {n for n, r in prev.items() if r.get("status") not in retry_set}
        if cut:
            err.print(f"[yellow]resume: cut a torn last line ({cut} bytes) from {escape(path)}[/yellow]")
    elif os.path.exists(path) and os.path.getsize(path) > 0:
        raise CliError(f"{path} exists; pass --resume to continue it, or --out another file")
    todo = [n for n in names if n not in done]
    if order == "size":  # known counts first, smallest first; unknown ones keep name order at the end
        todo.sort(key=lambda n: (prev.get(n, {}).get("total_params") is None, prev.get(n, {}).get("total_params") or 0))
    jobs = jobs or (os.cpu_count() or 1)
    max_mem = max_mem or Z.default_max_mem_mb(jobs)
    pool = Z.Pool(jobs=jobs, timeout=timeout, max_mem_mb=max_mem, threads=threads)
    err.print(f"nerofy zoo: {len(names)} models selected, {len(names) - len(todo)} already in {escape(path)}, "
              f"{len(todo)} to run ({mode}; {jobs} workers x {pool.threads} threads, timeout {timeout:g} s, memory guard {max_mem:.0f} MB"
              + (f", max params {max_params / 1e6:g}M" if (max_params and not structural) else "") + ")")
    if grad_checkpointing and (structural or source != "timm"):
        raise CliError("--grad-checkpointing applies to the full check of timm models")
    tasks = [{"name": n, "mode": mode, "steps": steps, "source": source, "batch": batch,
              **({"grad_checkpointing": True} if grad_checkpointing else {}),
              "verify": ("sample" if verify_sample else True) if verify else False,
              "max_params": int(max_params) if max_params else None} for n in todo]
    counts = {"pass": 0, "fail": 0, "skip": 0}
    t0 = time.monotonic()
    from .progress import ZooProgress

    with Z.JsonlWriter(path) as writer, ZooProgress(len(todo), err) as prog:
        def on_row(row: dict) -> None:
            writer.write(row)
            st = row["status"]
            key = "pass" if st == "pass" else "skip" if st == "skipped_size" else "fail"
            counts[key] += 1
            prog.advance(row, counts)

        pool.run(tasks, on_row, on_start=prog.started)
    wall = time.monotonic() - t0
    err.print(f"done in {wall:.0f} s: [green]{counts['pass']} pass[/green], [red]{counts['fail']} fail[/red], "
              f"[yellow]{counts['skip']} skipped_size[/yellow] -> {escape(path)}")
    if expected:
        with open(expected) as f:
            want = json.load(f)
        rows = Z.latest_by_name(Z.read_rows(path))
        want = {k: v for k, v in want.items() if k in names}
        regress, improve = Z.compare_expected(rows, want)
        for line in improve:
            err.print(f"[green]improved:[/green] {escape(line)} (update {escape(expected)})")
        if regress:
            for line in regress:
                err.print(f"[red]regression: {escape(line)}[/red]")
            raise typer.Exit(1)
        err.print(f"[green]no regression against {escape(expected)} ({len(want)} models)[/green]")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
@app.command()
@guarded
def report(
    results: List[str] = typer.Argument(..., help="JSONL file(s) written by nerofy zoo"),
    out_dir: str = typer.Option("model_zoo_checks", "--out-dir", "-o", help="where report.md, report.html and "
                                                                            "the plots go"),
    name: str = typer.Option("report", "--name", help="file stem: <name>.md, <name>.html, <name>_*.png"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="draw plots (needs matplotlib)"),
    expected_out: Optional[str] = typer.Option(None, "--expected-out", help="also write every model's status as "
                                                                             "JSON (name -> status) for zoo --expected"),
):
    """Render zoo results as Markdown and HTML: totals, failures by reason, a table per family, plots."""
    from . import report as R
    from . import zoo as Z

    rows = []
    for p in results:
        if not os.path.exists(p):
            raise CliError(f"no such results file: {p}")
        rows += Z.read_rows(p)
    if not rows:
        raise CliError(f"no rows in {', '.join(results)}")
    latest = Z.latest_by_name(rows)
    md, html = R.write_report(list(latest.values()), out_dir, name=name, plots=plots, sources=results)
    _err_console().print(f"wrote {escape(md)} and {escape(html)} ({len(latest)} models)")
    if expected_out:
        with open(expected_out, "w") as f:
            json.dump({k: latest[k]["status"] for k in sorted(latest)}, f, indent=1)
            f.write("\n")
        _err_console().print(f"wrote {escape(expected_out)} (the status of each of {len(latest)} models)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
