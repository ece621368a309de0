"""The typed definition keys agree with the code that uses them."""

from __future__ import annotations

import typing

import pytest

from vmferry.errors import ConfigError
from vmferry.machine import schema
from vmferry.machine.arm64_handler import parse_psci
from vmferry.machine.vm import ARCHES
from vmferry.machine.x86_ram import DIRTY_LOG_MODES


def test_every_dirty_log_mode_is_typed_and_reported() -> None:
    assert set(typing.get_args(schema.DirtyLog)) == set(schema.DIRTY_LOGS) == set(
        DIRTY_LOG_MODES)


def test_psci_choices_typed_and_parsed_alike() -> None:
    assert set(typing.get_args(schema.PsciChoice)) == set(schema.PSCI_CHOICES)
    for choice in schema.PSCI_CHOICES:
        parse_psci(choice)
    with pytest.raises(ConfigError):
        parse_psci("2.0")


def test_arch_keys_are_the_keys_each_arch_accepts() -> None:
    for arch, keys in schema.ARCH_KEYS.items():
        assert ARCHES[arch].extra_keys == keys, arch


def test_x86_keys_name_the_wrong_key() -> None:
    with pytest.raises(ConfigError, match="dirty_log"):
        schema.x86_keys({"dirty_log": "fast"})
    assert schema.x86_keys({}).dirty_log == "get"
