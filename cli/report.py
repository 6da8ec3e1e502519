"""``nerofy report``: zoo rows -> Markdown + HTML (totals, failures grouped by reason, one table per
family, plots). Plots need matplotlib (in the ``dev`` extra); without it the report says so."""
from __future__ import annotations

import base64
import html
import os
import re
import statistics
from collections import Counter, defaultdict

FAIL_ORDER = ("fail_create", "fail_trace", "fail_plan", "fail_rewrite", "fail_forward", "fail_backward", "fail_step",
              "fail_constraint", "fail_numerics", "timeout", "oom")


def is_fail(status: str) -> bool:
    return status not in ("pass", "skipped_size")


def reason_key(row: dict) -> str:
    """A failure's reason with the model-specific details (numbers, shapes, names) taken out, so
    that one cause groups into one line."""
    err = row.get("error", "") or "(no message)"
    err = re.sub(r"worker died \((signal \d+|exit code -?\d+)\) during (\w+):.*", r"worker died (\1) during \2", err)
    err = re.sub(r"'[^']*'", "'…'", err)
    err = re.sub(r'"[^"]*"', '"…"', err)
    err = re.sub(r"\[[^\]]*\]", "[…]", err)
    err = re.sub(r"\([\d, ]+\)", "(…)", err)
    err = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", err)
    return err[:160]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _f(x, fmt="{:.2f}", empty=""):
    return empty if x is None else fmt.format(x)


def _params(n) -> str:
    n = float(n or 0)
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def wrap_time(r: dict):
    t = r.get("times") or {}
    if "plan" not in t:
        return None
    return t.get("plan", 0) + t.get("rewrite", t.get("wrap", 0))


def summarize(rows: list[dict]) -> dict:
    st = Counter(r["status"] for r in rows)
    tr = Counter(r.get("tracer") or "-" for r in rows)
    fams = defaultdict(list)
    for r in rows:
        fams[r.get("family") or "?"].append(r)
    groups = defaultdict(list)
    for r in rows:
        if is_fail(r["status"]):
            groups[(r["status"], reason_key(r))].append(r["name"])
    warns = defaultdict(list)
    for r in rows:
        for w in r.get("warning_samples") or []:
            k = re.sub(r"^[\w.]+: ", "", w)  # the parameter's name
            k = re.sub(r"\d+", "N", k)[:140]
            if r["name"] not in warns[k]:
                warns[k].append(r["name"])
    versions: dict[str, Counter] = defaultdict(Counter)  # package -> version -> rows
    for r in rows:
        for k, v in (r.get("versions") or {}).items():
            versions[k][v] += 1
    return {"n": len(rows), "status": st, "tracer": tr, "families": dict(sorted(fams.items())),
            "groups": sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])),
            "warnings": sorted(warns.items(), key=lambda kv: (-len(kv[1]), kv[0])),
            "free": [r for r in rows if (r.get("tensors_by_role") or {}).get("free")],
            "versions": dict(sorted(versions.items())),
            "modes": Counter(r.get("mode", "?") for r in rows),
            "share": _median([r.get("constrained_share") for r in rows if r["status"] == "pass"]),
            "cpu_s": sum((r.get("times") or {}).get("total", 0) for r in rows)}


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def draw_plots(rows: list[dict], s: dict, out_dir: str, name: str) -> dict[str, str] | None:
    """Write the PNGs; returns {title: path}, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out = {}
    fams = s["families"]
    items = sorted(fams.items(), key=lambda kv: (sum(r["status"] == "pass" for r in kv[1]) / len(kv[1]), kv[0]))
    h = max(4.0, 0.16 * len(items) + 1)
    fig, ax = plt.subplots(figsize=(8, h))
    labels = [f"{k} ({len(v)})" for k, v in items]
    rate = [sum(r["status"] == "pass" for r in v) / len(v) for _, v in items]
    skip = [sum(r["status"] == "skipped_size" for r in v) / len(v) for _, v in items]
    ax.barh(labels, rate, color="#2ca02c", label="pass")
    ax.barh(labels, skip, left=rate, color="#ffbf00", label="skipped_size")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of models")
    ax.set_title("pass rate by family")
    ax.tick_params(axis="y", labelsize=6)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, f"{name}_pass_rate.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out["pass rate by family"] = p

    def scatter(key_fn, ylabel, title, fname):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for status, colour in (("pass", "#2ca02c"), ("skipped_size", "#ffbf00"), ("fail", "#d62728")):
            pts = [(r.get("total_params") or 0, key_fn(r)) for r in rows
                   if (is_fail(r["status"]) if status == "fail" else r["status"] == status)]
            pts = [(x, y) for x, y in pts if x and y]
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], s=7, alpha=0.6, color=colour, label=status)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        p = os.path.join(out_dir, f"{name}_{fname}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out[title] = p

    scatter(wrap_time, "seconds (plan + rewrite)", "wrap time against parameter count", "wrap_time")
    scatter(lambda r: r.get("peak_rss_mb") or None, "MB (worker peak RSS)", "peak memory against parameter count",
            "peak_memory")
    return out


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _family_rows(s: dict) -> list[list[str]]:
    out = []
    for fam, rs in s["families"].items():
        st = Counter(r["status"] for r in rs)
        fails = sum(v for k, v in st.items() if is_fail(k))
        tr = Counter(r.get("tracer") or "-" for r in rs)
        out.append([fam, str(len(rs)), str(st.get("pass", 0)), str(fails), str(st.get("skipped_size", 0)),
                    f"{st.get('pass', 0) / len(rs):.0%}", ", ".join(f"{k} {v}" for k, v in tr.most_common()),
                    _f(_median([r.get("constrained_share") for r in rs if r.get("constrained_share")]), "{:.1%}"),
                    _f(_median([wrap_time(r) for r in rs]), "{:.2f}")])
    return out


FAMILY_HEADER = ["family", "models", "pass", "fail", "skipped", "pass rate", "tracer", "median constrained",
                 "median wrap s"]
MODEL_HEADER = ["model", "status", "tracer", "params", "constrained", "neuron/gain/bias/other tensors", "checked at",
                "wrap s", "total s", "peak MB", "error"]


def checked_at(r: dict) -> str:
    """How a full-check row was run: batch and input size, and whether axes were sampled."""
    if r.get("mode") != "check" or not r.get("input_size"):
        return ""
    size = "x".join(str(d) for d in r["input_size"])
    verify = {"sample": ", axes sampled", False: ", axes not verified"}.get(r.get("verify"), "")
    gc = ", grad checkpointing" if r.get("grad_checkpointing") is True else ""
    return f"{r.get('batch') or 2} x {size}{verify}{gc}"


def check_settings(rows: list[dict]) -> str:
    """One sentence on the batch sizes and axis checks behind the full-check rows."""
    c = Counter((r.get("batch") or 2, r.get("verify", True)) for r in rows if r.get("mode") == "check"
                and r.get("input_size"))
    if not c:
        return ""
    parts = [f"{n} at batch {b}" + {"sample": " with axes verified on one parameter per distinct (module type, "
                                              "shape, axes)", False: " without axis verification"}.get(v, "")
             for (b, v), n in sorted(c.items(), key=lambda kv: -kv[1])]
    gc = sum(1 for r in rows if r.get("mode") == "check" and r.get("grad_checkpointing") is True)
    return ("Full checks run at each model's own input size: " + "; ".join(parts) + "."
            + (f" {gc} of them with gradient checkpointing (timm's set_grad_checkpointing: activations "
               "recomputed in backward), after their activations did not fit." if gc else ""))


def _model_row(r: dict) -> list[str]:
    tb = r.get("tensors_by_role") or {}
    other = sum(v for k, v in tb.items() if k not in ("neuron", "gain", "bias"))
    t = r.get("times") or {}
    return [r["name"], r["status"], r.get("tracer") or "", _params(r.get("total_params")),
            _f(r.get("constrained_share"), "{:.1%}") if r.get("tracer") else "",
            f"{tb.get('neuron', 0)}/{tb.get('gain', 0)}/{tb.get('bias', 0)}/{other}" if tb else "", checked_at(r),
            _f(wrap_time(r)), _f(t.get("total")), _f(r.get("peak_rss_mb"), "{:.0f}"), (r.get("error") or "")[:200]]


def _md_table(header, rows) -> str:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header, rows, cls="") -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = []
    for r in rows:
        st = r[1] if len(r) > 1 else ""
        css = "pass" if st == "pass" else "skip" if st == "skipped_size" else "fail" if st.startswith(("fail", "time", "oom")) else ""
        body.append(f"<tr class='{css}'>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return f"<table class='{cls}'><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _of_zoo(n: int, rows: list | None = None) -> str:
    """' (of the N in <zoo>)' for the zoo the rows come from (timm, or a --source zoo)."""
    srcs = {r.get("source", "timm") for r in rows or []} or {"timm"}
    if len(srcs) != 1:
        return ""
    src = srcs.pop()
    try:
        if src == "timm":
            import timm

            return f" (of the {len(timm.list_models())} in timm.list_models())"
        from . import sources

        return f" (of the {len(sources.names(src))} in nerofy's {src} list)"
    except Exception:
        return ""


def _versions(s: dict) -> str:
    """One line: each package's version; where rows differ (a sweep over several sessions), every
    version with its row count, most rows first."""
    parts = []
    for k, c in s["versions"].items():
        if len(c) == 1:
            parts.append(f"{k} {next(iter(c))}")
        else:
            parts.append(f"{k} " + " / ".join(f"{v} ({m} rows)" for v, m in c.most_common()))
    return "Versions: " + ", ".join(parts) + "."


def render_md(rows: list[dict], s: dict, pngs: dict[str, str] | None, out_dir: str, sources: list[str]) -> str:
    n = s["n"]
    L = [f"# nerofy zoo report", ""]
    L.append(f"{n} models{_of_zoo(n, rows)} from {', '.join(f'`{p}`' for p in sources)}; mode: "
             + ", ".join(f"{k} ({v})" for k, v in s["modes"].items()) + ".")
    if s["versions"]:
        L.append(_versions(s))
    L += ["", "## Totals", ""]
    L.append(_md_table(["status", "models", "share"],
                       [[k, str(v), f"{v / n:.1%}"] for k, v in sorted(s["status"].items(), key=lambda kv: -kv[1])]))
    L += ["", _md_table(["tracer", "models"], [[k, str(v)] for k, v in s["tracer"].most_common()]), ""]
    if s["share"] is not None:
        L.append(f"Median share of parameters constrained (passing models): {s['share']:.1%}. "
                 f"Summed per-model time: {s['cpu_s'] / 60:.1f} min.")
    settings = check_settings(rows)
    if settings:
        L += ["", settings]
    L += ["", "## Failures by reason", ""]
    if not s["groups"]:
        L.append("No failures.")
    else:
        L.append(_md_table(["status", "reason", "models", "examples"],
                           [[st, reason, str(len(names)), ", ".join(names[:6]) + (" …" if len(names) > 6 else "")]
                            for (st, reason), names in s["groups"]]))
    L += ["", "## Plan warnings", ""]
    if s["warnings"]:
        L.append(_md_table(["warning (first 5 per model)", "models", "examples"],
                           [[w, str(len(names)), ", ".join(names[:6]) + (" …" if len(names) > 6 else "")]
                            for w, names in s["warnings"]]))
    else:
        L.append("No warnings.")
    if s["free"]:
        L += ["", f"Models with parameters left unconstrained by fallback ('free'): {len(s['free'])}: "
              + ", ".join(f"{r['name']} ({r['tensors_by_role']['free']})" for r in s["free"]) + "."]
    if pngs:
        L += ["", "## Plots", ""]
        for title, p in pngs.items():
            L.append(f"![{title}]({os.path.relpath(p, out_dir)})")
            L.append("")
    elif pngs is None:
        L += ["", "(plots need matplotlib: pip install matplotlib)", ""]
    L += ["## Families", "", _md_table(FAMILY_HEADER, _family_rows(s)), ""]
    for fam, rs in s["families"].items():
        L += [f"### {fam}", "", _md_table(MODEL_HEADER, [_model_row(r) for r in sorted(rs, key=lambda r: r["name"])]), ""]
    return "\n".join(L) + "\n"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;
font-size:12px;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr.pass td:nth-child(2){color:#1a7f1a}tr.fail td:nth-child(2){color:#c00}
tr.skip td:nth-child(2){color:#b08000}img{max-width:100%}details{margin:.2em 0}summary{cursor:pointer}"""


def render_html(rows: list[dict], s: dict, pngs: dict[str, str] | None, sources: list[str]) -> str:
    n = s["n"]
    H = [f"<!doctype html><html><head><meta charset='utf-8'><title>nerofy zoo report</title><style>{CSS}</style>"
         "</head><body><h1>nerofy zoo report</h1>"]
    H.append(f"<p>{n} models{html.escape(_of_zoo(n, rows))} from {html.escape(', '.join(sources))}; mode: "
             + html.escape(", ".join(f"{k} ({v})" for k, v in s["modes"].items())) + "</p>")
    if s["versions"]:
        H.append("<p>" + html.escape(_versions(s)) + "</p>")
    H.append("<h2>Totals</h2>")
    H.append(_html_table(["status", "models", "share"],
                         [[k, str(v), f"{v / n:.1%}"] for k, v in sorted(s["status"].items(), key=lambda kv: -kv[1])]))
    H.append(_html_table(["tracer", "models"], [[k, str(v)] for k, v in s["tracer"].most_common()]))
    if s["share"] is not None:
        H.append(f"<p>Median share of parameters constrained (passing models): {s['share']:.1%}. "
                 f"Summed per-model time: {s['cpu_s'] / 60:.1f} min.</p>")
    settings = check_settings(rows)
    if settings:
        H.append(f"<p>{html.escape(settings)}</p>")
    H.append("<h2>Failures by reason</h2>")
    if s["groups"]:
        H.append(_html_table(["status", "reason", "models", "examples"],
                             [[st, reason, str(len(names)), ", ".join(names)] for (st, reason), names in s["groups"]]))
    else:
        H.append("<p>No failures.</p>")
    H.append("<h2>Plan warnings</h2>")
    if s["warnings"]:
        H.append(_html_table(["warning (first 5 per model)", "models", "examples"],
                             [[w, str(len(names)), ", ".join(names)] for w, names in s["warnings"]]))
    else:
        H.append("<p>No warnings.</p>")
    if pngs:
        H.append("<h2>Plots</h2>")
        for title, p in pngs.items():
            with open(p, "rb") as f:
                b64 = base64.b64encode(f.read()).decode()
            H.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>")
    H.append("<h2>Families</h2>")
    H.append(_html_table(FAMILY_HEADER, _family_rows(s)))
    for fam, rs in s["families"].items():
        st = Counter(r["status"] for r in rs)
        H.append(f"<details><summary><b>{html.escape(fam)}</b>: {len(rs)} models, {st.get('pass', 0)} pass</summary>")
        H.append(_html_table(MODEL_HEADER, [_model_row(r) for r in sorted(rs, key=lambda r: r["name"])]))
        H.append("</details>")
    H.append("</body></html>")
    return "\n".join(H) + "\n"


def write_report(rows: list[dict], out_dir: str, name: str = "report", plots: bool = True,
                 sources: list[str] | None = None) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    s = summarize(rows)
    pngs = draw_plots(rows, s, out_dir, name) if plots else {}
    md_path, html_path = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.html")
    with open(md_path, "w") as f:
        f.write(render_md(rows, s, pngs, out_dir, sources or []))
    with open(html_path, "w") as f:
        f.write(render_html(rows, s, pngs, sources or []))
    return md_path, html_path
