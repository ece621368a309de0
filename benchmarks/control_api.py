"""What the control API's checks and client cost.

In one process, against one in-process daemon on 127.0.0.1, measures:

* request validation: a VM definition through the typed model and the host's resource
  check, per definition, against the machine layer's own parse alone (the baseline);
* a listing (``GET /v1/vms``) through the aiohttp client's synchronous facade (one event
  loop and session per call, as the CLI uses it) and through a long-lived
  ``AsyncHostClient`` session, against a plain ``urllib`` request with the token (the
  baseline);
* a refused request (401) and a refused bad body (400) through ``urllib``.

Prints one JSON object with microseconds per operation and the ratios to the baselines.

    PYTHONPATH=src python benchmarks/control_api.py [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.unit.host.apphost import TOKEN, app_host

from vmferry.host.client import AsyncHostClient
from vmferry.host.models import VmDefinitionModel, validate
from vmferry.host.resources import check_fits
from vmferry.machine.vm import load_definition

DEFINITION: dict[str, Any] = {
    "name": "bench", "memory_mib": 64, "vcpus": 2, "fill": "mixed",
    "workload": {"dirty_rate_mbps": 20.0, "pattern": "hot"},
    "devices": [{"id": "nic0", "driver": "mlx5", "state_mib": 4,
                 "dma_region": [1 << 20, 65536], "seed": 1}],
}


def per_op_us(fn: Callable[[], object], n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def urllib_call(url: str, method: str = "GET", body: bytes | None = None,
                token: str | None = TOKEN) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    n = ap.parse_args().requests
    out: dict[str, Any] = {"requests": n}

    def typed() -> None:
        check_fits(validate(VmDefinitionModel, DEFINITION), "bench")
        load_definition(DEFINITION)

    out["validate_definition_us"] = per_op_us(typed, 2000)
    out["machine_parse_only_us"] = per_op_us(lambda: load_definition(DEFINITION), 2000)
    out["validation_ratio"] = out["validate_definition_us"] / out["machine_parse_only_us"]

    with tempfile.TemporaryDirectory() as tmp, app_host(Path(tmp) / "A") as host:
        url = host.url
        out["urllib_get_us"] = per_op_us(lambda: urllib_call(f"{url}/v1/vms"), n)
        sync = host.client()
        out["facade_get_us"] = per_op_us(lambda: sync.get("/v1/vms"), n)

        async def session_loop() -> float:
            async with AsyncHostClient(url, TOKEN) as c:
                await c.get("/v1/vms")
                t0 = time.perf_counter()
                for _ in range(n):
                    await c.get("/v1/vms")
                return (time.perf_counter() - t0) / n * 1e6

        out["session_get_us"] = asyncio.run(session_loop())
        out["unauthorized_us"] = per_op_us(
            lambda: urllib_call(f"{url}/v1/vms", token="x" * 32), n)
        bad = json.dumps({"definition": {"name": "b", "memory_mib": -1}}).encode()
        out["bad_body_us"] = per_op_us(
            lambda: urllib_call(f"{url}/v1/vms", "POST", bad), n)
        out["facade_ratio"] = out["facade_get_us"] / out["urllib_get_us"]
        out["session_ratio"] = out["session_get_us"] / out["urllib_get_us"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()},
                     indent=2))


if __name__ == "__main__":
    main()
