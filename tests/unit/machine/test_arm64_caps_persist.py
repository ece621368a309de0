"""Issue 14 item 5: the arm64 destination description on the persist contract.

``DestinationCaps.to_json`` writes version 2 (format + version keys, enums by name or
value); ``from_json`` reads it and version 1 -- the object the release before wrote,
committed in tests/fixtures/arm64 -- and refuses anything else with a typed decode error
naming the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import BadMagic, MalformedRecord, StreamDecodeError, UnsupportedVersion
from vmferry.machine.arm64_compat import (
    CAPS_FORMAT,
    CAPS_VERSION,
    DestinationCaps,
    describe_destination,
)
from vmferry.machine.profiles import load_profile

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "arm64"
V1 = json.loads((FIXTURES / "caps-v1.json").read_text())
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture(scope="module")
def caps() -> DestinationCaps:
    return describe_destination(load_profile(EXPECTED["profile"]))


def test_item5_caps_of_the_release_still_load(caps: DestinationCaps) -> None:
    assert "version" not in V1
    old = DestinationCaps.from_json(V1)
    assert old.profile == EXPECTED["profile"] and len(old.own.ids) == EXPECTED["reg_count"]
    assert {f"{rid:#018x}": sorted(a.values) if a.mask is None else a.mask
            for rid, a in old.accepts.items()} == EXPECTED["accepts"]
    assert {wa.key: p.value for wa, p in old.protection.items()} == EXPECTED["protection"]
    assert old.psci_default == EXPECTED["psci_default"]
    assert old.merge_mode.value == EXPECTED["merge_mode"]
    assert old == caps  # the same host described by either release is the same state


def test_item5_new_caps_keep_every_key_an_earlier_source_reads(caps: DestinationCaps) -> None:
    new = json.loads(json.dumps(caps.to_json()))
    assert new["format"] == CAPS_FORMAT and new["version"] == CAPS_VERSION == 2
    assert {k: v for k, v in new.items() if k not in ("format", "version")} == V1
    assert DestinationCaps.from_json(new) == caps


def _patched(path: list[str], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(V1)
    data["format"], data["version"] = CAPS_FORMAT, CAPS_VERSION
    at = data
    for key in path[:-1]:
        at = at[key]
    if value is KeyError:
        del at[path[-1]]
    else:
        at[path[-1]] = value
    return data


@pytest.mark.parametrize(("path", "value", "error", "words"), [
    (["version"], 3, UnsupportedVersion, "version 3"),
    (["version"], "2", UnsupportedVersion, "version '2'"),
    (["format"], "qemu", BadMagic, "format 'qemu'"),
    (["format"], KeyError, BadMagic, "format None"),
    (["kernel"], KeyError, MalformedRecord, "kernel: missing"),
    (["psci_default"], True, MalformedRecord, "psci_default: expected an integer"),
    (["reg_ids"], [1, 2], MalformedRecord, "initial: "),
    (["merge_mode"], 1, MalformedRecord, "merge_mode: 1 is not a MergeMode"),
    (["protection", "wa1"], "maybe", MalformedRecord, "protection[wa1]: 'maybe'"),
    (["protection", "wa9"], "none", MalformedRecord, "'wa9' is not a Workaround"),
    (["accepts", "zz"], {"mask": 1}, MalformedRecord, "accepts[zz]: not a hexadecimal"),
    (["accepts", "0x6030000000140000", "values"], "2", MalformedRecord,
     "accepts[0x6030000000140000].values: expected a list"),
    (["accepts", "0x6030000000160000"], [], MalformedRecord, "expected an object"),
])  # fmt: skip
def test_item5_bad_caps_name_what_is_wrong(path: list[str], value: Any,
                                           error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        DestinationCaps.from_json(_patched(path, value))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)


@given(st.sampled_from(sorted(V1)), JSON)
def test_item5_any_damaged_caps_is_a_typed_error_or_a_state(key: str, value: Any) -> None:
    data = copy.deepcopy(V1)
    data[key] = value
    try:
        got = DestinationCaps.from_json(data)
    except StreamDecodeError as exc:
        assert "malformed destination capabilities" in str(exc)
        return
    assert isinstance(got, DestinationCaps)  # a value the decoder took is a typed one
    assert all(isinstance(x, int) for x in got.own.ids + got.own.values)
