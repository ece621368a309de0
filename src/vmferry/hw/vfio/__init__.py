"""VFIO device migration protocol v2: states, FSM, device core, reference drivers."""

from vmferry.hw.vfio.device import ALL_FAULTS, VfioMigrationDevice
from vmferry.hw.vfio.drivers import (
    DRIVERS,
    DeviceCapability,
    HisiAccDriver,
    Mlx5Driver,
    PdsDriver,
    VariantDriver,
)
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.factory import create_device
from vmferry.hw.vfio.fsm import FSM_MODES, TABLE, next_state, path
from vmferry.hw.vfio.persist import ChunkSequencer, decode_capability, encode_capability
from vmferry.hw.vfio.states import DeviceState, MigrationFlags
from vmferry.hw.vfio.stream import DataStream, FdTable, PrecopyInfo
from vmferry.hw.vfio.vmm import (
    MultifdLoader,
    VmmDevice,
    check_migratable,
    preflight,
    resume_all,
    switchover,
)

__all__ = [
    "ALL_FAULTS",
    "DRIVERS",
    "FSM_MODES",
    "TABLE",
    "ChunkSequencer",
    "DataStream",
    "DeviceCapability",
    "DeviceState",
    "FdTable",
    "HisiAccDriver",
    "MigrationFlags",
    "Mlx5Driver",
    "MultifdLoader",
    "PdsDriver",
    "PrecopyInfo",
    "VariantDriver",
    "VfioError",
    "VfioMigrationDevice",
    "VmmDevice",
    "check_migratable",
    "create_device",
    "decode_capability",
    "encode_capability",
    "next_state",
    "path",
    "preflight",
    "resume_all",
    "switchover",
]
