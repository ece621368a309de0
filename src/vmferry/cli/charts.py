"""Charts of a migration job's pre-copy passes (``vmferry job report``).

Four panels share the pass number as their x axis: what each pass sent, the bandwidth it
measured against the rate the guest dirtied memory meanwhile, the expected downtime after
it against the downtime limit (log scale: the first pass's estimate is often orders of
magnitude above the limit), and the auto-converge throttle.  Drawn with matplotlib on the
Agg backend (no display needed); the HTML report embeds the figure as inline SVG in a
jinja2 page with the job's summary.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import jinja2

from vmferry.cli.progress import (
    MIB,
    dirty_mib_per_s,
    mib_per_s,
    page_size,
    passes_of,
)
from vmferry.errors import ConfigError
from vmferry.host.outcome import downtime_limit, verdict

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: the colours each series is drawn in (tests look for them in the rendered page)
COLOURS: Final = {
    "sent": "#4c72b0",
    "bandwidth": "#2ca02c",
    "dirty": "#d62728",
    "expected": "#9467bd",
    "limit": "#ff7f0e",
    "throttle": "#8c564b",
}

_PAGE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>vmferry job {{ job.id }}</title>
<style>
 body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px; color: #222; }
 table.summary td { padding: 2px 12px 2px 0; font-size: 14px; }
 .warn { color: #b35c00; } .problem { color: #b00020; }
</style></head>
<body>
<h1>Migration job {{ job.id }}: {{ job.vm }}</h1>
<table class="summary">
{% for k, v in rows %}<tr><td><b>{{ k }}</b></td><td>{{ v }}</td></tr>
{% endfor %}</table>
{% for w in warnings %}<p class="warn">warning: {{ w }}</p>{% endfor %}
{% for p in problems %}<p class="problem">problem: {{ p }}</p>{% endfor %}
<figure id="passes">{{ svg | safe }}</figure>
</body></html>
""")


def figure(job: dict[str, Any]) -> Figure:
    """The four-panel figure of a source job's passes; ConfigError if it has none."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in the SVG

    passes = passes_of(job)
    if not passes:
        raise ConfigError(f"job {job.get('id')} has no pre-copy passes to chart "
                          "(charts are for source jobs that started copying)")
    psize = page_size(job)
    x = [p["number"] for p in passes]
    limit = downtime_limit(job)
    fig = Figure(figsize=(9, 10), layout="constrained")
    ax = fig.subplots(4, 1, sharex=True)
    fig.suptitle(f"job {job.get('id')}: {job.get('vm')} ({job.get('status')})")
    ax[0].bar(x, [p["bytes"] / MIB for p in passes], color=COLOURS["sent"], label="sent")
    ax[0].set_ylabel("sent (MiB)")
    ax[1].plot(x, [mib_per_s(p["mbps"]) for p in passes], marker="o",
               color=COLOURS["bandwidth"], label="bandwidth")
    ax[1].plot(x, [dirty_mib_per_s(p["dirty_pages_rate"], psize) for p in passes],
               marker="s", color=COLOURS["dirty"], label="dirty rate")
    ax[1].set_ylabel("MiB/s")
    ax[2].plot(x, [max(p["expected_downtime_ms"], 1e-3) for p in passes], marker="o",
               color=COLOURS["expected"], label="expected downtime")
    limits = [p.get("downtime_limit_ms") or limit for p in passes]
    if all(v is not None for v in limits):
        ax[2].step(x, limits, where="mid", linestyle="--", linewidth=2,
                   color=COLOURS["limit"], label="downtime limit")
    ax[2].set_yscale("log")
    ax[2].yaxis.set_major_formatter(ScalarFormatter())
    ax[2].yaxis.set_minor_formatter(NullFormatter())
    ax[2].set_ylabel("ms")
    ax[3].plot(x, [p["throttle_pct"] for p in passes], marker="o", linewidth=2,
               color=COLOURS["throttle"], label="throttle")
    ax[3].set_ylim(0, 100)
    ax[3].set_ylabel("throttle (%)")
    ax[3].set_xlabel("pre-copy pass")
    ax[3].set_xticks(x)
    for a in ax:
        a.grid(True, alpha=0.3)
        a.legend(loc="upper right")
    return fig


def write_png(job: dict[str, Any], path: Path) -> None:
    _save(figure(job), path, "png")


def write_html(job: dict[str, Any], path: Path) -> None:
    buf = io.StringIO()
    figure(job).savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML
    v = verdict(job)
    st = job.get("stats", {})
    rows = [
        ("status", str(job.get("status"))),
        ("passes", str(len(passes_of(job)))),
        ("downtime", f"{st.get('downtime', 0):.1f} ms (limit "
                     f"{downtime_limit(job) or 300:g} ms)"),
        ("total time", f"{st.get('total-time', 0):.0f} ms"),
        ("sent", f"{st.get('ram', {}).get('transferred', 0) / MIB:.1f} MiB"),
    ]
    page = _PAGE.render(job=job, rows=rows, warnings=v.warnings, problems=v.problems, svg=svg)
    _write(path, page.encode())


def _save(fig: Figure, path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100)
    _write(path, buf.getvalue())


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
