from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.errors import ConfigError
from vmferry.machine import create_vm, load_definition
from vmferry.machine.vcpu import CORE_REGS


def test_create_from_dict_and_run() -> None:
    vm = create_vm({"name": "t1", "memory_mib": 16, "vcpus": 2, "workload": {"dirty_rate_mbps": 5}})
    assert vm.ram.size == 16 * 1024 * 1024 and len(vm.vcpus) == 2
    assert not vm.running
    before = vm.vcpu_digest()
    assert vm.run_slice(0.1) == 0  # paused: nothing happens
    vm.start()
    vm.ram.start_dirty_log()
    assert vm.run_slice(0.1) > 0
    assert vm.vcpu_digest() != before
    assert vm.vcpus[0].get(CORE_REGS["cycles"]) == 100_000_000
    vm.pause()
    assert vm.run_slice(0.1) == 0


def test_create_from_toml(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text(
        'name = "toml-vm"\nmemory_mib = 8\nvcpus = 1\nfill = "random"\n'
        '[workload]\ndirty_rate_mbps = 2.5\npattern = "uniform"\n'
    )
    vm = create_vm(f)
    assert vm.definition.workload.pattern == "uniform"
    assert not vm.ram.zero_mask(0, vm.ram.npages).any()


@pytest.mark.parametrize(
    "bad",
    [
        {"memory_mib": 8},
        {"name": "bad name!", "memory_mib": 8},
        {"name": "x", "memory_mib": 0},
        {"name": "x", "memory_mib": 8, "vcpus": 0},
        {"name": "x", "memory_mib": 8, "arch": "sparc"},
        {"name": "x", "memory_mib": 8, "colour": "red"},
        {"name": "x", "memory_mib": 8, "fill": "lots"},
        {"name": "x", "memory_mib": True},
    ],
)
def test_bad_definitions(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        create_vm(bad)


def test_bad_toml(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text("name = ")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_definition(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_definition(tmp_path / "missing.toml")


def test_definition_roundtrip() -> None:
    d = load_definition({"name": "r", "memory_mib": 4, "workload": {"pattern": "sequential"}})
    assert load_definition(d.to_dict()) == d


def test_mixed_fill_has_zero_and_data() -> None:
    vm = create_vm({"name": "m", "memory_mib": 8, "fill": "mixed"})
    zero = vm.ram.zero_mask(0, vm.ram.npages)
    assert 0.4 < zero.mean() < 0.6
