"""The control API: HTTP + JSON, described by an OpenAPI document at /v1/openapi.json."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from vmferry import __version__
from vmferry.errors import ApiError, HostError, MigrationError, PeerError, VmferryError
from vmferry.host import observe
from vmferry.host.auth import bearer_matches
from vmferry.host.iommu import describe as describe_iommu
from vmferry.host.models import (
    MAX_BODY,
    CreateRequest,
    IncomingRequest,
    MigrateRequest,
    RestoreRequest,
    SaveRequest,
    openapi_schemas,
    parse_body,
    validate,
)
from vmferry.host.snapshot import restore_vm, save_vm
from vmferry.machine.profiles import HostProfile
from vmferry.machine.pseries_dt import device_tree_handler

if TYPE_CHECKING:
    from vmferry.host.daemon import HostDaemon  # the daemon imports this module to serve

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("vmferry.host.api")
T = TypeVar("T")


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))


#: routes anyone may call without the token: none.  (Kept as data so a route that must be
#: open -- a health probe, say -- is one visible line.)
OPEN_ROUTES: frozenset[str] = frozenset()


def error_response(exc: ApiError) -> web.Response:
    """``{"error": {"kind", "message", "step"}}`` with the error's status."""
    return _ok(exc.to_json(), exc.status)


def _status_for(exc: VmferryError) -> int:
    if isinstance(exc, PeerError):
        return 502
    return 400


def make_auth(d: HostDaemon) -> Middleware:
    """The bearer-token check every request passes first; refusals are logged (at most
    a few a minute, then counted, so a flood cannot fill the log)."""
    token = d.token
    if not token:
        raise HostError("the control API needs a token")
    limiter = _LogLimiter()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_ROUTES or bearer_matches(
            request.headers.get("Authorization"), token
        ):
            return await handler(request)
        what = "wrong" if "Authorization" in request.headers else "no"
        note = limiter.note()
        if note is not None:
            msg = (f"refused control request from {request.remote}: {what} token "
                   f"({request.method} {request.path[:200]!r}){note}")
            log.warning(msg)
            d.store.log("unauthorized", msg)
        return error_response(ApiError(401, "a valid bearer token is required "
                                            "(--token-file or VMFERRY_TOKEN)"))

    return auth


class _LogLimiter:
    """Lets ``burst`` log lines through per ``window_s``; then counts the rest."""

    def __init__(self, burst: int = 10, window_s: float = 60.0) -> None:
        self.burst, self.window_s = burst, window_s
        self.start, self.seen, self.dropped = 0.0, 0, 0

    def note(self) -> str | None:
        now = time.monotonic()
        if now - self.start > self.window_s:
            dropped, self.dropped = self.dropped, 0
            self.start, self.seen = now, 0
            if dropped:
                self.seen += 1
                return f" ({dropped} more refused and not logged)"
        self.seen += 1
        if self.seen > self.burst:
            self.dropped += 1
            return None
        return ""


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as ``{"error": {"kind", "message", "step"}}`` with its status."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except VmferryError as exc:
        step = exc.step if isinstance(exc, MigrationError) else ""
        message = exc.reason if isinstance(exc, MigrationError) else str(exc)
        return error_response(ApiError(_status_for(exc), message, type(exc).__name__, step))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(ApiError(exc.status, exc.reason))
    except Exception:
        log.exception("control request %s %s", request.method, request.path[:200])
        return error_response(ApiError(500, "internal error (see the host's log)"))


async def _body(request: web.Request) -> Any:
    """The request's JSON body (parsed without NaN/Infinity and with a depth limit)."""
    return parse_body(await request.read())


def host_profile_json(d: HostDaemon) -> dict[str, Any]:
    """The host's capability profile and mitigation (null for a generic host)."""
    profile = d.context.profile
    if not isinstance(profile, HostProfile):
        return {"profile": None, "mitigation": None}
    mitigation = profile.mitigation
    return {
        "profile": profile.name,
        "arch": profile.arch,
        "kernel": profile.kernel,
        "mitigation": mitigation.label() if mitigation is not None else None,
    }


class FileWork:
    """Blocking file work (save, restore) on a few threads of its own, so it can never
    take the threads the rest of the API needs; past ``queue`` waiting requests the
    answer is 503 at once."""

    def __init__(self, workers: int = 2, queue: int = 4) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="file-work")
        self.slots = threading.BoundedSemaphore(workers + queue)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.slots.acquire(blocking=False):
            raise ApiError(503, "too many saves and restores in progress; try again",
                           "Busy")
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.slots.release()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


async def _expire_reservations(d: HostDaemon, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(d.expire_reservations)


def make_app(d: HostDaemon, sweep_every_s: float = 1.0) -> web.Application:
    """The control API of ``d``.  Routes are registered by topic (``_host_routes``,
    ``_vm_routes``, ...); a new topic adds its own function to ``ROUTE_GROUPS``."""
    files = FileWork()
    app = web.Application(middlewares=[errors, make_auth(d)], client_max_size=MAX_BODY)
    for group in ROUTE_GROUPS:
        app.add_routes(group(d, files))
    observe.add_routes(app, d)  # event stream, /metrics, live job parameters

    async def sweeper(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_expire_reservations(d, sweep_every_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        files.close()

    app.cleanup_ctx.append(sweeper)
    return app


def _host_routes(d: HostDaemon, files: FileWork) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/v1/host")
    async def host(request: web.Request) -> web.Response:
        return _ok(
            {
                "name": d.name,
                "version": __version__,
                "control_url": d.control_url,
                "migration_address": list(d.migration_address),
                "vms": len(d.vms),
                "iommu": describe_iommu(d.context.iommu),
                "kvm": d.kvm,
                **host_profile_json(d),
            }
        )

    @routes.get("/v1/openapi.json")
    async def openapi(request: web.Request) -> web.Response:
        return _ok(OPENAPI)

    @routes.get("/v1/events")
    async def events(request: web.Request) -> web.Response:
        return _ok(d.store.events())

    return routes


def _vm_routes(d: HostDaemon, files: FileWork) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/v1/vms")
    async def list_vms(request: web.Request) -> web.Response:
        with d.lock:
            return _ok([h.to_json() for h in d.vms.values()])

    @routes.post("/v1/vms")
    async def create(request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, dict) and "definition" in body:
            req = validate(CreateRequest, body)
            definition, start = req.definition, req.start
        else:  # a bare definition
            definition, start = body, False
        hosted = await asyncio.to_thread(d.create, definition, start)
        return _ok(hosted.to_json(), 201)

    @routes.get("/v1/vms/{name}")
    async def show(request: web.Request) -> web.Response:
        hosted = d.get_vm(request.match_info["name"])
        out = hosted.to_json()
        if request.query.get("digest") and hosted.vm is not None and hosted.runner is not None:

            def digest() -> dict[str, str]:
                assert hosted.vm is not None and hosted.runner is not None
                with hosted.runner.lock:
                    return {"ram": hosted.vm.ram.digest(), "vcpu": hosted.vm.vcpu_digest()}

            out["digests"] = await asyncio.to_thread(digest)
        return _ok(out)

    @routes.post("/v1/vms/{name}/start")
    async def start(request: web.Request) -> web.Response:
        return _ok(d.set_running(request.match_info["name"], True).to_json())

    @routes.post("/v1/vms/{name}/pause")
    async def pause(request: web.Request) -> web.Response:
        return _ok(d.set_running(request.match_info["name"], False).to_json())

    @routes.delete("/v1/vms/{name}")
    async def destroy(request: web.Request) -> web.Response:
        await asyncio.to_thread(d.destroy, request.match_info["name"])
        return _ok({"destroyed": request.match_info["name"]})

    @routes.get("/v1/vms/{name}/dtb")
    async def dtb(request: web.Request) -> web.Response:
        hosted = d.get_vm(request.match_info["name"])
        if hosted.vm is None:
            raise ApiError(409, f"VM {hosted.name} is not on this host")
        lock = hosted.runner.lock if hosted.runner is not None else contextlib.nullcontext()
        with lock:  # the guest's thread updates the tree on arrival
            blob = device_tree_handler(hosted.vm).dtb()
        return web.Response(body=blob, content_type="application/octet-stream")

    @routes.post("/v1/vms/{name}/save")
    async def save(request: web.Request) -> web.Response:
        req = validate(SaveRequest, await _body(request))
        out = await files.run(save_vm, d, request.match_info["name"], req.path, req.force)
        return _ok(out)

    @routes.post("/v1/restore")
    async def restore(request: web.Request) -> web.Response:
        req = validate(RestoreRequest, await _body(request))
        out = await files.run(restore_vm, d, req.path, req.start)
        return _ok(out, 201)

    return routes


def _migration_routes(d: HostDaemon, files: FileWork) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.post("/v1/vms/{name}/migrate")
    async def migrate(request: web.Request) -> web.Response:
        body = await _body(request)
        req = validate(MigrateRequest, body)
        params = body.get("params", {})  # as given: the job records what was asked
        job = await asyncio.to_thread(d.migrate, request.match_info["name"], req.destination,
                                      params)
        return _ok(d.job_json(job), 202)

    @routes.post("/v1/incoming")
    async def incoming(request: web.Request) -> web.Response:
        req = validate(IncomingRequest, await _body(request))
        inc, caps = await asyncio.to_thread(
            d.expect_incoming, req.vm, req.definition, req.verify, req.peer or
            str(request.remote),
        )
        return _ok(
            {"token": inc.token, "job": inc.job_id, "capabilities": caps,
             "migration_address": list(d.migration_address)},
            201,
        )

    @routes.get("/v1/jobs")
    async def jobs(request: web.Request) -> web.Response:
        with d.lock:
            return _ok([d.job_json(j) for j in d.jobs.values()])

    @routes.get("/v1/jobs/{id}")
    async def job(request: web.Request) -> web.Response:
        return _ok(d.job_json(d.get_job(request.match_info["id"])))

    @routes.post("/v1/jobs/{id}/cancel")
    async def cancel(request: web.Request) -> web.Response:
        return _ok(d.job_json(d.cancel(request.match_info["id"])))

    return routes


#: every group of routes the control API serves
ROUTE_GROUPS: list[Callable[[HostDaemon, FileWork], web.RouteTableDef]] = [
    _host_routes, _vm_routes, _migration_routes,
]


def _ref(model: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model}"}


def _op(summary: str, reply: str | dict[str, Any] | None = None, body: str | None = None,
        code: str = "200") -> dict[str, Any]:
    content: dict[str, Any] = {}
    if reply is not None:
        content = {"application/json": {"schema": _ref(reply) if isinstance(reply, str)
                                        else reply}}
    error = {"content": {"application/json": {"schema": _ref("ErrorBody")}}}
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {
            code: {"description": "OK", "content": content},
            "400": {"description": "invalid request", **error},
            "401": {"description": "no valid bearer token", **error},
            "404": {"description": "unknown VM or job", **error},
            "409": {"description": "conflict with the VM's or job's state", **error},
            "422": {"description": "the VM does not fit this host (VmTooLarge)", **error},
            "502": {"description": "a peer host cannot be reached", **error},
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(body)}}}
    return op


def _list(model: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(model)}


_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_OBJECT: dict[str, Any] = {"type": "object"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "vmferry host control API", "version": __version__},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": openapi_schemas(),
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/host": {"get": _op("This host: name, version, migration address, profile",
                                "HostInfo")},
        "/v1/openapi.json": {"get": _op("This document", _OBJECT)},
        "/v1/vms": {
            "get": _op("List VMs", _list("VmInfo")),
            "post": _op("Create a VM from a definition ({definition, start}, or a bare "
                        "definition)", "VmInfo", "CreateRequest", "201"),
        },
        "/v1/vms/{name}": {
            "parameters": _NAME,
            "get": _op("Show a VM (?digest=1 for digests)", "VmInfo"),
            "delete": _op("Destroy a VM", _OBJECT),
        },
        "/v1/vms/{name}/start": {"parameters": _NAME, "post": _op("Run the vCPUs", "VmInfo")},
        "/v1/vms/{name}/pause": {"parameters": _NAME,
                                 "post": _op("Pause the vCPUs", "VmInfo")},
        "/v1/vms/{name}/migrate": {
            "parameters": _NAME,
            "post": _op("Live-migrate", "JobInfo", "MigrateRequest", "202"),
        },
        "/v1/vms/{name}/dtb": {
            "parameters": _NAME,
            "get": _op("The VM's current device tree as a flattened tree (.dtb bytes)"),
        },
        "/v1/vms/{name}/save": {
            "parameters": _NAME,
            "post": _op("Save the VM's state to a stream file in the images directory",
                        "SaveReply", "SaveRequest"),
        },
        "/v1/restore": {"post": _op("Restore a VM from a stream file in the images directory",
                                    "RestoreReply", "RestoreRequest", "201")},
        "/v1/incoming": {
            "post": _op("Expect an incoming VM; returns a one-time token", "IncomingReply",
                        "IncomingRequest", "201")
        },
        "/v1/jobs": {"get": _op("List migration jobs", _list("JobInfo"))},
        "/v1/jobs/{id}": {"parameters": _ID, "get": _op("Show a job with statistics",
                                                        "JobInfo")},
        "/v1/jobs/{id}/cancel": {"parameters": _ID, "post": _op("Cancel a running job",
                                                                "JobInfo")},
        "/v1/events": {"get": _op("Recent host events (refused connections ...)",
                                  {"type": "array", "items": _OBJECT})},
        **observe.OPENAPI_PATHS,
    },
}
