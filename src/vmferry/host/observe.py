"""What operators plug in: the event stream, Prometheus metrics, live job parameters.

Routes (added to the control API by :func:`add_routes`):

* ``GET /v1/events/stream`` -- server-sent events (see :mod:`vmferry.host.events`);
* ``GET /metrics`` -- Prometheus text format, families prefixed ``vmferry_``;
* ``POST /v1/jobs/{id}/params`` -- change ``downtime_limit_ms`` / ``max_bandwidth_mib``
  of a running migration (virsh ``migrate-setmaxdowntime`` / ``migrate-setspeed``).

Metrics are read from the daemon at scrape time by a custom collector, so they are always
the daemon's own numbers (nothing to keep in step).  Units follow Prometheus conventions:
bytes, seconds, ratios; the dirty rate is in pages per second as QEMU reports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmferry.errors import ApiError
from vmferry.host.events import HEARTBEAT_S, Event, matches

if TYPE_CHECKING:
    from vmferry.host.daemon import HostDaemon

RUNSTATES = ("running", "paused", "migrating", "migrated", "failed", "recovering")
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def add_routes(app: web.Application, d: HostDaemon) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(d))

    async def events_stream(request: web.Request) -> web.StreamResponse:
        job, vm = request.query.get("job"), request.query.get("vm")
        if job is not None:
            d.get_job(job)  # 404 for an unknown job, before the stream starts
        sub = d.events.subscribe()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for first in _snapshot(d, job, vm):
                await resp.write(first.sse())
            while True:
                try:
                    event = await asyncio.wait_for(sub.queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    await resp.write(b": heartbeat\n\n")
                    continue
                if event is None:
                    break
                if matches(event, job, vm):
                    await resp.write(event.sse())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            d.events.unsubscribe(sub)
        return resp

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    async def job_params(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as exc:
            raise ApiError(400, f"request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        job = d.set_job_params(request.match_info["id"], body)
        return web.json_response(d.job_json(job))

    app.router.add_get("/v1/events/stream", events_stream)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/jobs/{id}/params", job_params)


def _snapshot(d: HostDaemon, job: str | None, vm: str | None) -> list[Event]:
    """The current state of what a new stream asked for, as events (sequence 0)."""
    with d.lock:
        jobs = list(d.jobs.values())
        vms = list(d.vms.values())
    if job is not None:
        return [Event(0, "job", d.job_json(j)) for j in jobs if j.id == job]
    out = [Event(0, "vm", {"name": h.name, "runstate": h.runstate})
           for h in vms if vm is None or h.name == vm]
    if vm is not None:
        out += [Event(0, "job", d.job_json(j)) for j in jobs if j.vm == vm]
    return out


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/events/stream": {"get": {
        "summary": "Server-sent events: job, vm and host events (?job=ID or ?vm=NAME)",
        "responses": {"200": {"description": "text/event-stream"}}}},
    "/metrics": {"get": {
        "summary": "Prometheus metrics (vmferry_* families)",
        "responses": {"200": {"description": "Prometheus text format"}}}},
    "/v1/jobs/{id}/params": {"post": {
        "summary": "Change downtime_limit_ms and max_bandwidth_mib of a running migration",
        "responses": {"200": {"description": "the job"}}}},
}


class DaemonCollector(Collector):
    """Prometheus families read from a daemon at scrape time."""

    def __init__(self, d: HostDaemon) -> None:
        self.d = d

    def collect(self) -> Iterator[Metric]:
        with self.d.lock:
            vms = [(h.name, str(h.runstate), h.vm) for h in self.d.vms.values()]
            jobs = [self.d.job_json(j) for j in self.d.jobs.values()]
        yield from _vm_families(vms)
        yield from _job_families(jobs)
        refused = CounterMetricFamily(
            "vmferry_refused_connections",
            "Migration connections the listener refused (bad or expired token, bad hello)")
        refused.add_metric([], float(self.d.store.count_events("refused")))
        yield refused


def _vm_families(vms: list[tuple[str, str, Any]]) -> Iterator[Metric]:
    state = GaugeMetricFamily("vmferry_vm_runstate",
                              "1 for the VM's current runstate, 0 for the others",
                              labels=["vm", "runstate"])
    count = GaugeMetricFamily("vmferry_vms", "VMs on this host by runstate",
                              labels=["runstate"])
    throttle = GaugeMetricFamily("vmferry_vm_throttle_ratio",
                                 "Auto-converge throttle applied to the guest (0-1)",
                                 labels=["vm"])
    for name, runstate, vm in vms:
        for s in sorted({*RUNSTATES, runstate}):
            state.add_metric([name, s], 1.0 if s == runstate else 0.0)
        if vm is not None:
            throttle.add_metric([name], vm.workload.throttle_pct / 100)
    for s in RUNSTATES:
        count.add_metric([s], float(sum(1 for _, r, _ in vms if r == s)))
    yield from (state, count, throttle)


def _job_families(jobs: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["job", "vm", "role"]
    total = CounterMetricFamily("vmferry_migrations", "Migration jobs by role and status",
                                labels=["role", "status"])
    fam = {
        "bytes": CounterMetricFamily("vmferry_migration_transferred_bytes",
                                     "Stream bytes sent by a source job", labels=labels),
        "remaining": GaugeMetricFamily("vmferry_migration_remaining_bytes",
                                       "Dirty bytes left at the end of the last pass",
                                       labels=labels),
        "passes": GaugeMetricFamily("vmferry_migration_passes",
                                    "Pre-copy passes completed", labels=labels),
        "downtime": GaugeMetricFamily("vmferry_migration_downtime_seconds",
                                      "Downtime of a completed migration", labels=labels),
        "expected": GaugeMetricFamily("vmferry_migration_expected_downtime_seconds",
                                      "Expected downtime after the last pass", labels=labels),
        "limit": GaugeMetricFamily("vmferry_migration_downtime_limit_seconds",
                                   "The job's downtime limit", labels=labels),
        "dirty": GaugeMetricFamily("vmferry_migration_dirty_pages_rate",
                                   "Pages dirtied per second in the last pass",
                                   labels=labels),
        "bandwidth": GaugeMetricFamily("vmferry_migration_bandwidth_bytes_per_second",
                                       "Bandwidth measured in the last pass", labels=labels),
        "throttle": GaugeMetricFamily("vmferry_migration_throttle_ratio",
                                      "Auto-converge throttle of the job's guest (0-1)",
                                      labels=labels),
    }
    counts: dict[tuple[str, str], int] = {}
    for job in jobs:
        key = (str(job["role"]), str(job["status"]))
        counts[key] = counts.get(key, 0) + 1
        if job["role"] != "source":
            continue
        _add_job(fam, [job["id"], job["vm"], job["role"]], job)
    for (role, status), n in sorted(counts.items()):
        total.add_metric([role, status], float(n))
    yield total
    yield from fam.values()


def _add_job(fam: dict[str, Any], lv: list[str], job: dict[str, Any]) -> None:
    st = job.get("stats") or {}
    ram = st.get("ram") or {}
    fam["bytes"].add_metric(lv, float(ram.get("transferred", 0)))
    fam["remaining"].add_metric(lv, float(ram.get("remaining", 0)))
    fam["passes"].add_metric(lv, float(len(st.get("passes", []))))
    if job["status"] == "completed":
        fam["downtime"].add_metric(lv, float(st.get("downtime", 0.0)) / 1e3)
    fam["expected"].add_metric(lv, float(st.get("expected-downtime", 0.0)) / 1e3)
    limit = (job.get("params") or {}).get("downtime_limit_ms")
    if isinstance(limit, int | float):
        fam["limit"].add_metric(lv, float(limit) / 1e3)
    fam["dirty"].add_metric(lv, float(ram.get("dirty-pages-rate", 0.0)))
    fam["bandwidth"].add_metric(lv, float(ram.get("mbps", 0.0)) * 1e6 / 8)
    fam["throttle"].add_metric(lv, float(st.get("cpu-throttle-percentage", 0)) / 100)
