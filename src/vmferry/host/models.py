"""Typed request and response models of the control API, and the VM definition's shape.

Every request body is parsed by :func:`parse_body` (``pydantic_core``'s JSON parser: no
``NaN``/``Infinity``, a nesting limit, no recursion in Python) and validated by one of the
request models here, in strict mode: booleans are JSON booleans (``"false"`` is refused),
numbers are finite and bounded, names are anchored, and unknown keys are refused.  A
failure is an :class:`~vmferry.errors.ApiError` 400 whose message names each field and
what was wrong with it.

The same models generate the OpenAPI document's schemas (:func:`openapi_schemas`).

:class:`VmDefinitionModel` checks every key of a definition: the shared ones, each
architecture's own (typed by :mod:`vmferry.machine.schema`; a key of another
architecture is refused, named), and the sizes in the device tables (what a definition
can make a host allocate).  A device's driver options stay with its driver.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vmferry.errors import ApiError
from vmferry.machine.schema import ARCH_KEYS, DeviceTreeModel, DirtyLog, PsciChoice
from vmferry.machine.vm import MAX_VCPUS

#: the VM name rule (pydantic's regular expressions match ``$`` only at the very end)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: the largest guest the definition format allows (16 TiB); the host's memory caps it
#: further (see :mod:`vmferry.host.resources`)
MAX_MEMORY_MIB = 16 * 1024 * 1024
MAX_SEED = 2**63 - 1
#: a body larger than this is refused before it is parsed
MAX_BODY = 1024 * 1024

VmName = Annotated[str, Field(pattern=NAME_PATTERN, description="letters, digits, -_. ; "
                                                                "at most 64")]
FileName = Annotated[str, Field(min_length=1, max_length=4096,
                            description="a file in the host's images directory (relative "
                                        "to it, or absolute inside it)")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Strict(BaseModel):
    """Strict types, finite numbers, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Open(BaseModel):
    """Strict for the fields it names; other keys are checked by the code that uses them."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


# --- VM definitions --------------------------------------------------------------------


class WorkloadModel(Strict):
    dirty_rate_mbps: float = Field(default=0.0, ge=0, le=1_000_000)
    pattern: Literal["uniform", "hot", "sequential"] = "hot"
    hot_fraction: float = Field(default=0.1, gt=0, le=1)
    hot_weight: float = Field(default=0.9, ge=0, le=1)
    seed: Seed = 1


class DeviceModel(Open):
    """A VFIO device table (driver options beyond these are the driver's)."""

    id: str = Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
                    description="printable ASCII, at most 255 characters")
    driver: str = Field(max_length=64)
    state_mib: float | None = Field(default=None, gt=0, le=4096)
    seed: Seed | None = None
    host_device: str | None = Field(default=None, max_length=64)


class TceWindowModel(Open):
    liobn: int = Field(ge=0, lt=2**32)
    offset: int = Field(default=0, ge=0, lt=2**60)
    size_mib: int = Field(gt=0, le=1 << 30)
    page_shift: int = Field(ge=12, le=34)


class DmaDeviceModel(Open):
    name: str = Field(min_length=1, max_length=64)
    liobn: int = Field(ge=0, lt=2**32)
    buffers: int = Field(default=8, ge=1, le=4096)
    buffer_kib: int = Field(default=16, ge=1, le=1024)
    rate_mbps: float = Field(default=4.0, ge=0, le=1_000_000)


class VmDefinitionModel(Strict):
    """A VM definition: the shared keys, each architecture's own, and the sizes of its
    devices and DMA windows.  An unknown key, or a key of another architecture, is
    refused by name."""

    name: VmName
    arch: str = Field(default="generic", max_length=32)
    memory_mib: int = Field(default=1024, ge=1, le=MAX_MEMORY_MIB)
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    workload: WorkloadModel = Field(default_factory=WorkloadModel)
    fill: Literal["zero", "random", "mixed"] = "zero"
    seed: Seed = 1
    devices: list[DeviceModel] = Field(default_factory=list, max_length=64)
    tce_windows: list[TceWindowModel] = Field(default_factory=list, max_length=64)
    dma_devices: list[DmaDeviceModel] = Field(default_factory=list, max_length=64)
    #: x86_64: how KVM's dirty log is read
    dirty_log: DirtyLog = "get"
    #: arm64: the PSCI version pinned after vCPU init
    psci: PsciChoice = "default"
    #: pseries: the guest's device-tree update handler
    device_tree: DeviceTreeModel | None = None

    @model_validator(mode="after")
    def _arch_keys(self) -> VmDefinitionModel:
        theirs = {key: arch for arch, keys in ARCH_KEYS.items() for key in keys}
        for key in sorted(self.model_fields_set):
            arch = theirs.get(key)
            if arch is not None and arch != self.arch:
                raise ValueError(f"{key!r} is a key of arch {arch} VMs, not of {self.arch}")
        return self


# --- requests --------------------------------------------------------------------------


class CreateRequest(Strict):
    definition: dict[str, Any] = Field(description="a VM definition (see VmDefinitionModel)")
    start: bool = False


class SaveRequest(Strict):
    path: FileName
    #: replace an existing file of that name (without it: 409 ``FileExists``)
    force: bool = False


class RestoreRequest(Strict):
    path: FileName
    start: bool = True


class MigrationParamsModel(Strict):
    """What ``POST /v1/vms/{name}/migrate`` takes as ``params``."""

    downtime_limit_ms: float = Field(default=300.0, gt=0, le=3_600_000)
    max_bandwidth_mib: float | None = Field(default=None, gt=0, le=1_000_000)
    offline: bool = False
    max_passes: int = Field(default=5, ge=1, le=1000)
    auto_converge: bool = True
    verify: bool = False
    compat: Literal["preflight", "qemu"] = "preflight"
    allow_degraded: bool = False
    #: RAM over this many parallel data channels beside the main connection (0: RAM in
    #: the main stream); None: the host's default
    parallel: int | None = Field(default=None, ge=0, le=16)
    #: fault injection for tests (``PHASE:ACTION``)
    fault: str | None = Field(default=None, max_length=64)
    #: also write the exact stream sent to this file in the images directory
    stream_file: FileName | None = None
    #: forget the VM on the source once it runs on the destination (virsh --undefinesource)
    undefine_source: bool = False


class MigrateRequest(Strict):
    destination: str = Field(
        pattern=r"^https?://[A-Za-z0-9.\-\[\]:]{1,255}(/[^\s]*)?$", max_length=2048,
        description="the destination host's control URL (http://HOST:PORT)",
    )
    params: MigrationParamsModel = Field(default_factory=MigrationParamsModel)


class IncomingRequest(Strict):
    vm: VmName
    definition: dict[str, Any]
    verify: bool = False
    peer: str = Field(default="", max_length=2048)


# --- responses (for the OpenAPI document; handlers build plain JSON) --------------------


class ErrorDetail(Strict):
    kind: str = Field(description="a stable name: NotFound, Conflict, VmTooLarge, ...")
    message: str
    step: str = Field(description="where it failed; empty when the request failed whole")


class ErrorBody(Strict):
    error: ErrorDetail


class VmInfo(Open):
    name: str
    runstate: Literal["running", "paused", "migrating", "migrated", "saving", "failed"]
    definition: dict[str, Any]
    memory_bytes: int | None = None
    vcpus: int | None = None


class JobInfo(Open):
    id: str
    vm: str
    role: Literal["source", "destination"]
    peer: str
    status: str
    params: dict[str, Any]
    stats: dict[str, Any]
    error: str
    step: str
    created: float
    updated: float


class HostInfo(Open):
    name: str
    version: str
    control_url: str
    migration_address: list[Any]
    vms: int


class IncomingReply(Strict):
    token: str
    job: str
    capabilities: dict[str, Any]
    migration_address: list[Any]


class SaveReply(Open):
    vm: str
    path: str
    bytes: int


class RestoreReply(Strict):
    vm: str
    path: str
    runstate: str


M = TypeVar("M", bound=BaseModel)


def parse_body(raw: bytes) -> Any:
    """A request body as JSON; ApiError 400 for anything that is not (NaN and Infinity
    included) or is nested too deeply."""
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"request body over {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}", "BadJson") from exc


def validate(model: type[M], data: Any, what: str = "request") -> M:
    """``data`` as ``model``; ApiError 400 listing each field's problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, f"invalid {what}: {describe(exc)}", "InvalidRequest") from exc


def describe(exc: ValidationError) -> str:
    """Each problem as ``field.path: message`` (at most 5, without the offending input)."""
    out = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(f"{where}: {msg.removeprefix('Value error, ')}")
    more = exc.error_count() - len(out)
    return "; ".join(out) + (f" (and {more} more)" if more > 0 else "")


def openapi_schemas() -> dict[str, Any]:
    """``components.schemas`` of the OpenAPI document, from the models."""
    schemas: dict[str, Any] = {}
    for model in (VmDefinitionModel, CreateRequest, SaveRequest, RestoreRequest,
                  MigrateRequest, IncomingRequest, ErrorBody, VmInfo, JobInfo, HostInfo,
                  IncomingReply, SaveReply, RestoreReply):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = schema
    return schemas
