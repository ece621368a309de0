"""The control API: HTTP + JSON, described by an OpenAPI document at /v1/openapi.json."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from vmferry import __version__
from vmferry.errors import ApiError, HostError, MigrationError, PeerError, VmferryError
from vmferry.host.auth import bearer_matches
from vmferry.host.daemon import HostDaemon
from vmferry.host.iommu import describe as describe_iommu
from vmferry.host.snapshot import restore_vm, save_vm
from vmferry.machine.profiles import HostProfile
from vmferry.machine.pseries_dt import device_tree_handler

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("vmferry.host.api")


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


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


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


def _string(body: dict[str, Any], key: str, what: str) -> str:
    """A required string field of a request body; HTTP 400 naming it otherwise."""
    value = body.get(key)
    if not isinstance(value, str):
        raise ApiError(400, f"{key} ({what}) required")
    return value


def make_app(d: HostDaemon) -> web.Application:
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

    @routes.get("/v1/vms")
    async def list_vms(request: web.Request) -> web.Response:
        with d.lock:
            return _ok([h.to_json() for h in d.vms.values()])

    @routes.post("/v1/vms")
    async def create(request: web.Request) -> web.Response:
        body = await _body(request)
        start = bool(body.pop("start", False)) if "definition" in body else False
        definition = body.get("definition", body)
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
        path = Path(_string(await _body(request), "path", "a file on this host"))
        out = await asyncio.to_thread(save_vm, d, request.match_info["name"], path)
        return _ok(out)

    @routes.post("/v1/restore")
    async def restore(request: web.Request) -> web.Response:
        body = await _body(request)
        path = Path(_string(body, "path", "a file on this host"))
        out = await asyncio.to_thread(restore_vm, d, path, bool(body.get("start", True)))
        return _ok(out, 201)

    @routes.post("/v1/vms/{name}/migrate")
    async def migrate(request: web.Request) -> web.Response:
        body = await _body(request)
        dest = _string(body, "destination", "control URL of the destination host")
        params = body.get("params", {})
        if not isinstance(params, dict):
            raise ApiError(400, "params must be an object")
        job = await asyncio.to_thread(d.migrate, request.match_info["name"], dest, params)
        return _ok(d.job_json(job), 202)

    @routes.post("/v1/incoming")
    async def incoming(request: web.Request) -> web.Response:
        body = await _body(request)
        name, definition = body.get("vm"), body.get("definition")
        if not isinstance(name, str) or not isinstance(definition, dict):
            raise ApiError(400, "vm (name) and definition (object) required")
        inc, caps = await asyncio.to_thread(
            d.expect_incoming,
            name, definition, bool(body.get("verify")), str(body.get("peer", request.remote)),
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

    @routes.get("/v1/events")
    async def events(request: web.Request) -> web.Response:
        return _ok(d.store.events())

    app = web.Application(middlewares=[errors, make_auth(d)], client_max_size=8 * 1024 * 1024)
    app.add_routes(routes)
    return app


def _op(summary: str, body: bool = False, code: str = "200") -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            code: {"description": "OK", "content": {"application/json": {}}},
            "4XX": {"description": 'error: {"error": message}'},
        },
    }
    if body:
        op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
    return op


_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "vmferry host control API", "version": __version__},
    "paths": {
        "/v1/host": {"get": _op("This host: name, version, migration address, profile")},
        "/v1/openapi.json": {"get": _op("This document")},
        "/v1/vms": {
            "get": _op("List VMs"),
            "post": _op("Create a VM from a definition ({definition, start})", True, "201"),
        },
        "/v1/vms/{name}": {
            "parameters": _NAME,
            "get": _op("Show a VM (?digest=1 for digests)"),
            "delete": _op("Destroy a VM"),
        },
        "/v1/vms/{name}/start": {"parameters": _NAME, "post": _op("Run the vCPUs")},
        "/v1/vms/{name}/pause": {"parameters": _NAME, "post": _op("Pause the vCPUs")},
        "/v1/vms/{name}/migrate": {
            "parameters": _NAME,
            "post": _op("Live-migrate ({destination, params})", True, "202"),
        },
        "/v1/vms/{name}/dtb": {
            "parameters": _NAME,
            "get": _op("The VM's current device tree as a flattened tree (.dtb bytes)"),
        },
        "/v1/vms/{name}/save": {
            "parameters": _NAME,
            "post": _op("Save the VM's state to a stream file on this host ({path})", True),
        },
        "/v1/restore": {"post": _op("Restore a VM from a stream file ({path, start})", True,
                                    "201")},
        "/v1/incoming": {
            "post": _op("Expect an incoming VM; returns a one-time token", True, "201")
        },
        "/v1/jobs": {"get": _op("List migration jobs")},
        "/v1/jobs/{id}": {"parameters": _ID, "get": _op("Show a job with statistics")},
        "/v1/jobs/{id}/cancel": {"parameters": _ID, "post": _op("Cancel a running job")},
        "/v1/events": {"get": _op("Recent host events (refused connections ...)")},
    },
}
