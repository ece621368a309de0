"""Reference variant drivers: pds-like, mlx5-like and hisi_acc-like."""

from vmferry.hw.vfio.drivers.base import (
    ACTIVITY,
    Activity,
    DeviceCapability,
    DmaRegion,
    VariantDriver,
)
from vmferry.hw.vfio.drivers.hisi_acc import HisiAccDriver
from vmferry.hw.vfio.drivers.mlx5 import Mlx5Driver
from vmferry.hw.vfio.drivers.pds import PdsDriver

DRIVERS: dict[str, type[VariantDriver]] = {
    PdsDriver.name: PdsDriver,
    Mlx5Driver.name: Mlx5Driver,
    HisiAccDriver.name: HisiAccDriver,
}

__all__ = [
    "ACTIVITY",
    "DRIVERS",
    "Activity",
    "DeviceCapability",
    "DmaRegion",
    "HisiAccDriver",
    "Mlx5Driver",
    "PdsDriver",
    "VariantDriver",
]
