"""``vmferry host serve --platform FILE``: the host's platform, checked before the daemon
starts and used to build pseries VMs with this host's memory map."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vmferry.cli.host import load_platform
from vmferry.cli.main import cli
from vmferry.errors import ConfigError
from vmferry.host.daemon import HostDaemon
from vmferry.machine.pseries import tce_handler
from vmferry.machine.vm import HostContext

SPLIT = """[spapr]
hpa_base = 0x4000_0000_0000
iommu_page_shift = 24
memslots = [{size_mib = 32, backing_shift = 24}, {size_mib = 32, backing_shift = 16}]
"""


def test_a_platform_file_builds_vms_with_this_hosts_memory_map(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(SPLIT)
    platform = load_platform(path)
    daemon = HostDaemon("p", tmp_path / "p", context=HostContext("p", platform=platform))
    try:
        vm = daemon.build_vm({"name": "v", "arch": "pseries", "memory_mib": 64})
        try:
            host = tce_handler(vm).iommu.host
            assert [(s.gpa, s.size, s.hpa, s.backing_shift) for s in host.slots] == [
                (0, 32 << 20, 0x4000_0000_0000, 24),
                (32 << 20, 32 << 20, 0x4000_0000_0000 + (32 << 20), 16),
            ]
            caps = vm.capabilities()["spapr-tce"]
            assert caps["iommu_page_shift"] == 24 and caps["rebuild"]
            assert [r[2] for r in caps["regions"]] == [24, 16]
        finally:
            vm.close()
    finally:
        daemon.store.close()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[spapr\n", "invalid TOML"),
        ("[spapr]\n[sparp]\nx = 1\n", "sparp: unknown key"),
        ("vfio_driver = [\"mlx5\"]\n", "vfio_driver: unknown key"),
        # issue 13: every table's keys are checked, the wrong one named
        ("[kvm]\nhide_msr = [16]\n", "kvm.hide_msr: unknown key"),
        ("[kvm]\nhide_cpuid = [\"7:ebz:5\"]\n", "kvm.hide_cpuid.0"),
        ("[spapr]\ntce_mod = \"kernel\"\n", "spapr.tce_mod: unknown key"),
        ("[lpm]\nnuma_domian = 1\n", "lpm.numa_domian: unknown key"),
        ("[lpm]\nnuma_domain = \"1\"\n", "lpm.numa_domain"),
        ("vfio_drivers = [\"mlx6\"]\n", "unknown VFIO drivers"),
        ("[spapr]\niommu_page_shift = 13\n", "iommu_page_shift"),
        ("[spapr]\nmemslots = [{size_mib = 1, backing_shift = 24}]\n", "whole backing pages"),
    ],
)
def test_a_bad_platform_stops_before_the_daemon_starts(
    text: str, match: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_platform(path)
    args = ["host", "serve", "--name", "h", "--state-dir", f"{tmp_path}/h", "--platform", str(path)]
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, ConfigError)
    assert not (tmp_path / "h").exists()


def test_a_missing_platform_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read platform file"):
        load_platform(tmp_path / "absent.toml")
