"""Following a migration job: live progress, Ctrl-C, and the words at the end.

A job is followed through the host's event stream (no polling).  On a terminal a rich
display shows one row per finished pre-copy pass and a bar for the pass in flight; when
standard output is not a terminal, one line per pass (and a line every
:data:`LINE_EVERY_S` seconds while a long pass runs).

Ctrl-C while following: with ``cancel`` the job is cancelled and followed until the cancel
settles, then the VM's whereabouts are printed; a second Ctrl-C (or the first, without
``cancel``) detaches and prints how to follow the job again.

Units, stated everywhere: sizes in binary units (KiB, MiB, GiB), bandwidth and dirty rate
in MiB/s, times in ms.  The JSON keeps QMP's names and units (``ram.mbps`` is megabits per
second, ``ram.dirty-pages-rate`` pages per second).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from vmferry.cli.common import client, console, err_console, esc, human_bytes
from vmferry.errors import ApiError, HostError
from vmferry.host.events import stream_events
from vmferry.host.outcome import Exit, Verdict, downtime_limit, verdict

FINISHED = ("completed", "failed", "cancelled")
_CAPTION = ("MiB sent, pass time in ms, bandwidth MiB/s; dirty: MiB/s the guest dirtied "
            "meanwhile; exp.: expected downtime against its limit, ms; thr%: auto-converge "
            "throttle")
LINE_EVERY_S = 3.0
MIB = 1 << 20


class Detached(Exception):
    """The operator pressed Ctrl-C to stop following; the job goes on."""


# --- units ---------------------------------------------------------------------------------


def passes_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A source job's pass records (a destination job counts passes, no records)."""
    passes = (job.get("stats") or {}).get("passes")
    return passes if isinstance(passes, list) else []


def mib_per_s(mbps: float) -> float:
    """QMP's ``mbps`` (megabits per second) in MiB/s."""
    return mbps * 1e6 / 8 / MIB


def page_size(job: dict[str, Any]) -> int:
    ram = job.get("stats", {}).get("ram", {})
    size = ram.get("page-size") or 0
    if not size and ram.get("normal"):
        size = ram.get("normal-bytes", 0) // ram["normal"]
    return int(size) or 4096


def dirty_mib_per_s(pages_per_s: float, psize: int) -> float:
    return pages_per_s * psize / MIB


# --- following -----------------------------------------------------------------------------


def job_updates(url: str, job_id: str) -> Iterator[dict[str, Any]]:
    """The job's state each time it changes, ending with its finished state."""
    c = client(url)
    for event in stream_events(url, token=c.token, job=job_id, tls=c.tls):
        if event.kind != "job":
            continue
        yield event.data
        if event.data.get("status") in FINISHED:
            return
    raise HostError(f"host {url} closed the event stream before job {job_id} finished")


def follow(url: str, job_id: str, *, live: bool, lines: bool) -> dict[str, Any]:
    """Follow a job to its end, showing progress (``live``: rich display; ``lines``: one
    line per pass).  KeyboardInterrupt propagates."""
    if live:
        return _follow_live(url, job_id)
    printer = LinePrinter() if lines else None
    job: dict[str, Any] = {}
    for job in job_updates(url, job_id):
        if printer is not None:
            printer.update(job)
    return job


def follow_with_interrupt(url: str, job_id: str, *, live: bool, lines: bool,
                          cancel: bool) -> tuple[dict[str, Any], bool]:
    """:func:`follow`, with Ctrl-C handled: returns (job, cancelled_by_ctrl_c).
    Raises :class:`Detached` when the operator detaches."""
    try:
        return follow(url, job_id, live=live, lines=lines), False
    except KeyboardInterrupt:
        if not cancel:
            raise Detached from None
    try:  # from here on, another Ctrl-C detaches
        err_console.print(f"[yellow]cancelling job {esc(job_id)}[/] (Ctrl-C again to detach)",
                          highlight=False)
        try:
            client(url).post(f"/v1/jobs/{job_id}/cancel")
        except ApiError as exc:
            if exc.status != 409:  # 409: it finished meanwhile
                raise
        return follow(url, job_id, live=False, lines=False), True
    except KeyboardInterrupt:
        raise Detached from None


def detach_message(url: str, job_id: str) -> str:
    return (f"detached: job {job_id} goes on; follow it with "
            f"'vmferry job watch --host {url} {job_id}'")


def whereabouts(job: dict[str, Any], source_url: str) -> str:
    """Where the job's VM is now, in words."""
    name = job.get("vm", "?")
    if job.get("status") == "completed":
        return f"VM {name} now runs on the destination ({job.get('peer')})"
    try:
        runstate = client(source_url).get(f"/v1/vms/{name}").get("runstate")
    except (HostError, AttributeError):
        runstate = "in an unknown state"
    return f"VM {name} stays on the source host ({source_url}), {runstate}"


# --- the rich display ----------------------------------------------------------------------


def _follow_live(url: str, job_id: str) -> dict[str, Any]:
    state: dict[str, Any] = {"job": {"id": job_id, "status": "setup", "stats": {}}}
    t0 = time.monotonic()

    def render() -> RenderableType:
        return live_view(state["job"], time.monotonic() - t0)

    with Live(get_renderable=render, console=console, refresh_per_second=4,
              transient=False):
        for job in job_updates(url, job_id):
            state["job"] = job
    return dict(state["job"])


def live_view(job: dict[str, Any], elapsed_s: float) -> RenderableType:
    """Finished passes, then the pass in flight with a bar of its own."""
    parts: list[RenderableType] = []
    if passes_of(job):
        parts.append(pass_table(job))
    status = job.get("status", "setup")
    done, target = current_pass(job)
    frac = min(done / target, 1.0) if target else 0.0
    number = len(passes_of(job)) + 1
    what = {"setup": "setting up", "active": f"pass {number}",
            "device": "switchover: vCPUs paused, final pass and device state"}.get(
        status, status)
    line = Text.assemble((f"{what:<14}", "bold"), f" {human_bytes(done)} of "
                         f"{human_bytes(target)}  ", f"elapsed {elapsed_s:.1f} s")
    parts.append(line)
    if status == "active":
        parts.append(ProgressBar(total=1.0, completed=frac, width=60))
    return Group(*parts)


def current_pass(job: dict[str, Any]) -> tuple[int, int]:
    """(bytes of pages sent in the pass in flight, bytes it has to send)."""
    stats = job.get("stats", {})
    ram = stats.get("ram", {})
    psize = page_size(job)
    passes = passes_of(job)
    sent_pages = ram.get("normal", 0) + ram.get("duplicate", 0) - sum(
        p.get("pages", 0) for p in passes)
    target_pages = (passes[-1].get("dirty_pages", 0) if passes
                    else ram.get("total", 0) // psize)
    return max(sent_pages, 0) * psize, target_pages * psize


def pass_table(job: dict[str, Any], title: str | None = None) -> Table:
    """One row per pre-copy pass: what it sent, how fast, what the guest dirtied meanwhile,
    the expected downtime against the limit and the throttle."""
    psize = page_size(job)
    limit = downtime_limit(job)
    table = Table(title=title, title_justify="left", caption=_CAPTION, caption_justify="left",
                  box=box.SIMPLE_HEAD)
    for col in ("pass", "pages", "MiB", "ms", "MiB/s", "dirty", "exp.", "limit", "thr%"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in passes_of(job):
        plimit = p.get("downtime_limit_ms") or limit
        exp = float(p.get("expected_downtime_ms", 0.0))
        over = plimit is not None and exp > plimit
        table.add_row(
            str(p["number"]), str(p["pages"]), f"{p['bytes'] / MIB:.1f}",
            f"{p['seconds'] * 1e3:.0f}", f"{mib_per_s(p['mbps']):.1f}",
            f"{dirty_mib_per_s(p['dirty_pages_rate'], psize):.1f}",
            Text(f"{exp:.1f}", style="yellow" if over else "green"),
            f"{plimit:g}" if plimit is not None else "-", str(p["throttle_pct"]))
    return table


# --- line output ---------------------------------------------------------------------------


class LinePrinter:
    """One line per finished pass and per status change; a progress line every
    :data:`LINE_EVERY_S` seconds in between.  Lines are flushed as they are printed."""

    def __init__(self) -> None:
        self.passes = 0
        self.status = ""
        self.last = time.monotonic()

    def update(self, job: dict[str, Any]) -> None:
        passes = passes_of(job)
        for p in passes[self.passes:]:
            self._say(pass_line(job, p))
        self.passes = max(self.passes, len(passes))
        status = str(job.get("status", ""))
        if status != self.status:
            self.status = status
            if status not in FINISHED:
                self._say(f"job {job.get('id')}: {status}")
        elif time.monotonic() - self.last >= LINE_EVERY_S and status == "active":
            done, target = current_pass(job)
            self._say(f"pass {len(passes) + 1}: {human_bytes(done)} of {human_bytes(target)} "
                      "sent")

    def _say(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        self.last = time.monotonic()


def pass_line(job: dict[str, Any], p: dict[str, Any]) -> str:
    psize = page_size(job)
    limit = p.get("downtime_limit_ms") or downtime_limit(job)
    lim = f" (limit {limit:g} ms)" if limit else ""
    return (f"pass {p['number']}: {human_bytes(p['bytes'])} in {p['seconds'] * 1e3:.0f} ms at "
            f"{mib_per_s(p['mbps']):.1f} MiB/s; dirty rate "
            f"{dirty_mib_per_s(p['dirty_pages_rate'], psize):.1f} MiB/s; expected downtime "
            f"{p['expected_downtime_ms']:.1f} ms{lim}; throttle {p['throttle_pct']} %")


# --- the end -------------------------------------------------------------------------------


def print_summary(job: dict[str, Any], *, with_passes: bool = True) -> Verdict:
    """The pass table, the downtime, the destination report and the verdict."""
    v = verdict(job)
    stats = job.get("stats", {})
    if with_passes and passes_of(job):
        console.print(pass_table(job, title="pre-copy passes"))
    if job.get("status") == "completed" and job.get("role", "source") == "source":
        console.print(esc(downtime_line(job)))
        for line in destination_lines(stats):
            console.print(esc(line), highlight=False)
    for w in v.warnings:
        console.print(f"[yellow]warning[/]: {esc(w)}", highlight=False)
    for p in v.problems:
        console.print(f"[red]problem[/]: {esc(p)}", highlight=False)
    style = {Exit.OK: "green", Exit.DESTINATION_PROBLEM: "red"}.get(v.code, "red")
    console.print(f"[{style}]{esc(v.headline)}[/]", highlight=False)
    return v


def downtime_line(job: dict[str, Any]) -> str:
    st = job.get("stats", {})
    b = st.get("downtime-breakdown", {})
    ram = st.get("ram", {})
    limit = downtime_limit(job)
    lim = f" (limit {limit:g} ms)" if limit is not None else ""
    return (f"downtime {st.get('downtime', 0):.1f} ms{lim}: final RAM "
            f"{b.get('final_ram_ms', 0):.1f}, state {b.get('state_ms', 0):.1f}, after "
            f"the stream {b.get('after_stream_ms', 0):.1f} ms; total "
            f"{st.get('total-time', 0):.0f} ms, "
            f"{human_bytes(ram.get('transferred', 0))} sent in {len(passes_of(job))} "
            "passes")


def destination_lines(stats: dict[str, Any]) -> list[str]:
    """The destination report, one line per handler."""
    out: list[str] = []
    verification = stats.get("verification") or {}
    if verification.get("requested"):
        ok = verification.get("verified")
        out.append(f"verification: RAM and vCPU digests {'equal' if ok else 'DIFFER'}")
    for name, rep in sorted((stats.get("destination_report") or {}).items()):
        if isinstance(rep, dict) and rep:
            out.append(f"destination {name}: {_report_words(rep)}")
    return out


def _report_words(rep: dict[str, Any]) -> str:
    words: list[str] = []
    if "ok" in rep:
        words.append("ok" if rep["ok"] else "NOT ok")
    if "nodes_changed" in rep:
        words.append(f"{len(rep['nodes_changed'])} nodes and "
                     f"{len(rep.get('properties_changed', []))} properties updated")
    if isinstance(rep.get("rebuild"), dict):
        r = rep["rebuild"]
        words.append(f"TCE entries {r.get('mapped', 0)} rebuilt, {r.get('cleared', 0)} dropped")
    if isinstance(rep.get("devices"), dict):
        words.append(", ".join(f"{k} {v if isinstance(v, str) else v.get('state', '?')}"
                               for k, v in sorted(rep["devices"].items())))
    if isinstance(rep.get("load"), dict):
        load = rep["load"]
        words.append(f"register merge {load.get('merge')}, {len(load.get('dropped', {}))} "
                     f"dropped, {len(load.get('missing', []))} missing")
    return "; ".join(words) or ", ".join(sorted(rep))


def job_info_table(job: dict[str, Any]) -> Table:
    """A job's statistics laid out as ``virsh domjobinfo`` does."""
    st = job.get("stats", {})
    ram = st.get("ram", {})
    psize = page_size(job)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    rows: list[tuple[str, str]] = [
        ("Job", f"{job.get('id')} ({'outgoing' if job.get('role') == 'source' else 'incoming'}"
                f" migration of {job.get('vm')})"),
        ("Peer", str(job.get("peer", ""))),
        ("Status", str(job.get("status")) + (f" at {job['step']}: {job['error']}"
                                             if job.get("error") else "")),
        ("Time elapsed", f"{st.get('total-time', 0):.0f} ms"),
        ("Setup time", f"{st.get('setup-time', 0):.1f} ms"),
        ("Data processed", human_bytes(ram.get("transferred", 0))),
        ("Data remaining", human_bytes(ram.get("remaining", 0))),
        ("Memory total", human_bytes(ram.get("total", 0))),
        ("Memory bandwidth", f"{mib_per_s(ram.get('mbps', 0)):.1f} MiB/s"),
        ("Dirty rate", f"{ram.get('dirty-pages-rate', 0):.0f} pages/s "
                       f"({dirty_mib_per_s(ram.get('dirty-pages-rate', 0), psize):.1f} MiB/s)"),
        ("Page size", human_bytes(psize)),
        ("Iteration", str(len(passes_of(job)))),
        ("Constant pages", str(ram.get("duplicate", 0))),
        ("Normal pages", str(ram.get("normal", 0))),
        ("Normal data", human_bytes(ram.get("normal-bytes", 0))),
        ("Dirty syncs", str(ram.get("dirty-sync-count", 0))),
        ("Dirty tracking", str(ram.get("dirty-tracking") or "-")),
        ("Device data", human_bytes(st.get("device-bytes", 0))),
        ("Expected downtime", f"{st.get('expected-downtime', 0):.1f} ms"),
        ("Total downtime", f"{st.get('downtime', 0):.1f} ms"),
        ("Downtime limit", limit_text(job)),
        ("Bandwidth limit", bw_text(job)),
        ("Auto converge throttle", f"{st.get('cpu-throttle-percentage', 0)} %"),
    ]
    if job.get("role") != "source":
        rows = [r for r in rows[:3]] + [("Passes received", str(st.get("passes", 0)))]
    for k, v in rows:
        t.add_row(k + ":", Text(v))  # text from the host, never markup
    return t


def limit_text(job: dict[str, Any]) -> str:
    limit = downtime_limit(job)
    return f"{limit:g} ms" if limit is not None else "300 ms (default)"


def bw_text(job: dict[str, Any]) -> str:
    bw = (job.get("params") or {}).get("max_bandwidth_mib")
    return f"{bw:g} MiB/s" if bw else "unlimited"
