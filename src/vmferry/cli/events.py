"""``vmferry events``: follow a host's event stream (jobs, VM runstates, refusals)."""

from __future__ import annotations

import json
import sys
import time

import click

from vmferry.cli.common import HOST_OPTION, JSON_OPTION, client, console
from vmferry.cli.progress import passes_of
from vmferry.host.events import Event, stream_events


def describe(event: Event) -> str:
    """One line for an event."""
    d = event.data
    if event.kind == "vm":
        return f"vm {d.get('name')}: {d.get('runstate')}"
    if event.kind == "job":
        what = f"job {d.get('id')} ({d.get('role')} of {d.get('vm')}): {d.get('status')}"
        if d.get("role") == "source" and d.get("status") == "active":
            what += f", pass {len(passes_of(d)) + 1}"
        if d.get("error"):
            what += f" at {d.get('step')}: {d.get('error')}"
        return what
    return f"host {d.get('kind')}: {d.get('message')}"


@click.command("events")
@HOST_OPTION
@click.option("--job", "job_id", default=None, help="only this job's events")
@click.option("--vm", default=None, help="only this VM's events")
@click.option("--count", type=click.IntRange(1), default=None,
              help="stop after this many events")
@JSON_OPTION
def command(host_url: str, job_id: str | None, vm: str | None, count: int | None,
            as_json: bool) -> None:
    """Follow a host's events as they happen (server-sent events; Ctrl-C stops).

    A job's statistics change many times a second while it runs; in text mode, only
    changes of status or pass are printed."""
    seen = 0
    last: dict[str, str] = {}
    try:
        c = client(host_url)
        for event in stream_events(host_url, token=c.token, job=job_id, vm=vm, tls=c.tls):
            if as_json:
                sys.stdout.write(json.dumps({"seq": event.seq, "kind": event.kind,
                                             "at": event.at, "data": event.data}) + "\n")
                sys.stdout.flush()
            else:
                line = describe(event)
                key = f"{event.kind}:{event.data.get('id', event.data.get('name'))}"
                if last.get(key) == line:
                    continue
                last[key] = line
                stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
                console.print(f"[dim]{stamp}[/] {line}", highlight=False)
            seen += 1
            if count is not None and seen >= count:
                return
    except KeyboardInterrupt:
        return
