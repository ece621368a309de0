"""Typed models of the architecture-specific keys of a VM definition and of a host's
platform file.

Every table here is strict: values have the type they say (``"16"`` is not an integer,
``1`` is not a boolean) and an unknown key is refused, named in the error
(``kvm.hide_msr: Extra inputs are not permitted``).  The host's control API validates a
definition against :class:`~vmferry.host.models.VmDefinitionModel`, which uses the
models here for the architecture's keys; ``vmferry host serve --platform FILE`` validates
the file against :class:`PlatformModel` before the daemon starts.  The code that builds a
VM reads the same models (:func:`check`), so a definition that reaches it by another way
(a TOML file, a stream's configuration) is held to the same rules.

Architecture keys (beside the shared ones and ``devices``):

==========  ===============  =================================================================
arch        key              model
==========  ===============  =================================================================
x86_64      ``dirty_log``    ``"get"`` | ``"manual-protect"`` | ``"ring"`` (:data:`DIRTY_LOGS`)
arm64       ``psci``         ``"default"`` or a PSCI version the VMM pins (:data:`PSCI_CHOICES`)
pseries     ``tce_windows``  DMA windows (sizes checked by the host model)
pseries     ``dma_devices``  emulated DMA devices
pseries     ``device_tree``  :class:`DeviceTreeModel`
==========  ===============  =================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from vmferry.errors import ConfigError
from vmferry.guest.mobility import MODES as MOBILITY_MODES
from vmferry.hw.spapr.platform import PlatformParams
from vmferry.hw.vfio.drivers import DRIVERS

M = TypeVar("M", bound=BaseModel)

#: how an x86_64 VM reads KVM's dirty log: ``KVM_GET_DIRTY_LOG``; manual protect (GET,
#: then CLEAR of the pages read); the per-vCPU dirty ring (``KVM_CAP_DIRTY_LOG_RING_ACQ_REL``)
DIRTY_LOGS = ("get", "manual-protect", "ring")
DirtyLog = Literal["get", "manual-protect", "ring"]
#: the arm64 ``psci`` choices: the kernel's default, or a version pinned after vCPU init
PSCI_CHOICES = ("default", "0.2", "1.0", "1.1", "1.2", "1.3")
PsciChoice = Literal["default", "0.2", "1.0", "1.1", "1.2", "1.3"]


class Strict(BaseModel):
    """Strict types, finite numbers, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def describe(exc: ValidationError, limit: int = 5) -> str:
    """Each problem as ``field.path: message`` (without the offending input)."""
    out = []
    for err in exc.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(f"{where}: {msg.removeprefix('Value error, ')}")
    more = exc.error_count() - len(out)
    return "; ".join(out) + (f" (and {more} more)" if more > 0 else "")


def check(model: type[M], data: object, where: str) -> M:
    """``data`` as ``model``; ConfigError naming each wrong or unknown key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe(exc)}") from None


# --- VM definition: architecture keys -----------------------------------------------------


class DeviceTreeModel(Strict):
    """A pseries VM's ``device_tree`` table: the guest's update handler."""

    mode: str = Field(default="correct", max_length=64,
                      description="an update-handler mode of vmferry.guest.mobility")
    user_space: Literal["", "held", "immediate"] = ""

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        if mode not in MOBILITY_MODES:
            raise ValueError(f"{mode!r} is not one of {sorted(MOBILITY_MODES)}")
        return mode


#: definition keys by architecture (``devices`` is for every architecture)
ARCH_KEYS: dict[str, frozenset[str]] = {
    "x86_64": frozenset({"dirty_log"}),
    "arm64": frozenset({"psci"}),
    "pseries": frozenset({"tce_windows", "dma_devices", "device_tree"}),
}


class X86Keys(Strict):
    dirty_log: DirtyLog = "get"


def x86_keys(extra: Mapping[str, Any]) -> X86Keys:
    return check(X86Keys, {k: v for k, v in extra.items() if k in ARCH_KEYS["x86_64"]},
                 "x86_64 VM definition")


# --- host platform file -------------------------------------------------------------------

MsrNumber = Annotated[int, Field(ge=0, lt=2**32)]
_NUM = r"(0[xX][0-9a-fA-F]+|[0-9]+)"
CpuidBit = Annotated[str, Field(
    pattern=rf"^{_NUM}(\.{_NUM})?:(eax|ebx|ecx|edx|EAX|EBX|ECX|EDX):([0-9]|[12][0-9]|3[01])$",
    description="LEAF[.SUB]:REG:BIT, e.g. \"7:ebx:5\" or \"0xd.1:eax:0\"")]
Addr = Annotated[int, Field(ge=0, lt=2**64)]


class KvmPlatformModel(Strict):
    """``[kvm]``: what this host pretends its KVM lacks or refuses (to exercise pre-flight's
    refusal path)."""

    hide_msrs: list[MsrNumber] = Field(default_factory=list, max_length=4096)
    refuse_msrs: list[MsrNumber] = Field(default_factory=list, max_length=4096)
    hide_cpuid: list[CpuidBit] = Field(default_factory=list, max_length=4096)


class MemslotModel(Strict):
    size_mib: int = Field(ge=1, le=1 << 30)
    backing_shift: Literal[16, 24] = 16


class SpaprPlatformModel(Strict):
    """``[spapr]``: how this host backs a pseries guest's RAM and its PHBs' IOMMU pages."""

    hpa_base: Addr | None = None
    ua_base: Addr | None = None
    backing_shift: Literal[16, 24] = 16
    memslots: list[MemslotModel] = Field(default_factory=list, max_length=512)
    iommu_page_shift: Literal[12, 16, 24] = 16
    tce_mode: str = Field(default="correct", max_length=64)


def _lpm_field(f: dataclasses.Field[Any]) -> Any:
    default = f.default
    if isinstance(default, bool):
        return (bool, default)
    if isinstance(default, int):
        return (Annotated[int, Field(ge=0, lt=1 << 32)], default)
    return (Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\x00]*$")], default)


#: ``[lpm]``: what this host's platform puts into a pseries guest's device tree
LpmPlatformModel: type[Strict] = create_model(
    "LpmPlatformModel", __base__=Strict,
    **{f.name: _lpm_field(f) for f in dataclasses.fields(PlatformParams)})


class IommuPlatformModel(BaseModel):
    """``[iommu]``: the IOMMU boot probe's mode and seed; the other keys are its topology
    (checked by the probe model)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    mode: str = Field(default="v6_15", max_length=64)
    seed: int = Field(default=0, ge=0, lt=2**63)


class PlatformModel(Strict):
    """A host platform file (``vmferry host serve --platform FILE``)."""

    spapr: SpaprPlatformModel | None = None
    lpm: LpmPlatformModel | None = None  # type: ignore[valid-type]
    iommu: IommuPlatformModel | None = None
    kvm: KvmPlatformModel | None = None
    vfio_drivers: list[str] | None = Field(default=None, max_length=64)

    @field_validator("vfio_drivers")
    @classmethod
    def _known_drivers(cls, drivers: list[str] | None) -> list[str] | None:
        unknown = sorted(set(drivers or ()) - set(DRIVERS))
        if unknown:
            raise ValueError(f"unknown VFIO drivers {unknown}; known: {sorted(DRIVERS)}")
        return drivers


def platform_model(platform: Mapping[str, Any], where: str = "platform file") -> PlatformModel:
    return check(PlatformModel, dict(platform), where)
