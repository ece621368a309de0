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
from vmferry.hw.vfio.states import DeviceState, MigrationFlags
from vmferry.hw.vfio.stream import DataStream, FdTable, PrecopyInfo

__all__ = [
    "ALL_FAULTS",
    "DRIVERS",
    "FSM_MODES",
    "TABLE",
    "DataStream",
    "DeviceCapability",
    "DeviceState",
    "FdTable",
    "HisiAccDriver",
    "MigrationFlags",
    "Mlx5Driver",
    "PdsDriver",
    "PrecopyInfo",
    "VariantDriver",
    "VfioError",
    "VfioMigrationDevice",
    "create_device",
    "next_state",
    "path",
]
