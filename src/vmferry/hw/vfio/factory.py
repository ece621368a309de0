"""Build a VFIO device from a VM-definition entry.

An entry looks like::

    {"id": "nic0", "driver": "mlx5", "state_mib": 4, "dma_region": [0x100000, 0x10000],
     "seed": 1}

Keys: ``id`` and ``driver`` (``pds``, ``mlx5``, ``hisi_acc``) and ``dma_region`` are
required; ``seed`` (int, default 0); ``state_mib`` (pds: default 1/16 = 65536 bytes, the
PDS_LM_DEVICE_STATE_LENGTH; mlx5: default 1; hisi_acc: not allowed, its state is a fixed
struct); ``p2p`` (pds only, bool, default False: STOP_COPY only); ``qp_num`` (hisi_acc only,
default 2); ``faults`` (list of fault names, default none).  Anything else is a
ConfigError, and so is a value of the wrong type.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmferry.errors import ConfigError
from vmferry.hw.memory import GuestMemory
from vmferry.hw.vfio.device import ALL_FAULTS, VfioMigrationDevice
from vmferry.hw.vfio.drivers import DRIVERS, DmaRegion, HisiAccDriver, Mlx5Driver, PdsDriver
from vmferry.hw.vfio.drivers.base import VariantDriver
from vmferry.hw.vfio.drivers.pds import PDS_STATE_LENGTH
from vmferry.hw.vfio.stream import FdTable

MIB = 1 << 20
COMMON_KEYS = {"id", "driver", "dma_region", "seed", "faults"}
DRIVER_KEYS: dict[str, set[str]] = {
    "pds": {"state_mib", "p2p"},
    "mlx5": {"state_mib"},
    "hisi_acc": {"qp_num"},
}


def _int(spec: Mapping[str, object], key: str, default: int) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"device {spec.get('id')!r}: {key} must be a non-negative int")
    return value


def _state_size(spec: Mapping[str, object], default: int) -> int:
    value = spec.get("state_mib")
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"device {spec.get('id')!r}: state_mib must be a positive number")
    return int(value * MIB)


def _dma(spec: Mapping[str, object]) -> DmaRegion:
    region = spec.get("dma_region")
    if not isinstance(region, list | tuple) or len(region) != 2 \
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in region):  # fmt: skip
        raise ConfigError(f"device {spec.get('id')!r}: dma_region must be [gpa, size]")
    return DmaRegion(int(region[0]), int(region[1]))


def _faults(spec: Mapping[str, object]) -> list[str]:
    faults = spec.get("faults", [])
    if not isinstance(faults, list | tuple) or not all(f in ALL_FAULTS for f in faults):
        raise ConfigError(f"device {spec.get('id')!r}: faults must be a list of {ALL_FAULTS}")
    return [str(f) for f in faults]


def _driver(spec: Mapping[str, object], memory: GuestMemory) -> VariantDriver:
    kind = spec["driver"]
    dma, seed = _dma(spec), _int(spec, "seed", 0)
    if kind == "pds":
        p2p = spec.get("p2p", False)
        if not isinstance(p2p, bool):
            raise ConfigError(f"device {spec['id']!r}: p2p must be a bool")
        return PdsDriver(memory, dma, seed, _state_size(spec, PDS_STATE_LENGTH), p2p=p2p)
    if kind == "mlx5":
        return Mlx5Driver(memory, dma, seed, _state_size(spec, MIB))
    return HisiAccDriver(memory, dma, seed, qp_num=_int(spec, "qp_num", 2))


def create_device(
    spec: Mapping[str, object], memory: GuestMemory, *, fds: FdTable | None = None
) -> VfioMigrationDevice:
    """A device in state RUNNING from a VM-definition entry; ConfigError if invalid."""
    ident, kind = spec.get("id"), spec.get("driver")
    if not isinstance(ident, str) or not ident:
        raise ConfigError(f"VFIO device entry needs a non-empty string id: {dict(spec)}")
    if kind not in DRIVERS:
        raise ConfigError(f"device {ident!r}: unknown driver {kind!r}; known: {sorted(DRIVERS)}")
    unknown = set(spec) - COMMON_KEYS - DRIVER_KEYS[str(kind)]
    if unknown:
        raise ConfigError(f"device {ident!r}: unknown key(s) {sorted(unknown)} for "
                          f"driver {kind!r}")  # fmt: skip
    driver = _driver(spec, memory)
    return VfioMigrationDevice(driver, name=ident, fds=fds, faults=_faults(spec))
