"""Host capability profiles: one TOML file per host kernel era, shipped with the package.

A profile file has at least ``name``, ``arch``, ``kernel`` and ``description``; the rest is
read by the parser registered for its ``arch`` in :data:`ARCH_PARSERS` (other architectures
register theirs the same way).  ``overrides`` is deep-merged into the file's table before
parsing, so a daemon can change a host property (``{"mitigation": {"wa1": "not_avail"}}``,
or the shortcut ``{"mitigation": "not_avail"}`` for every workaround) without a new file.

Every failure -- unknown name, unreadable TOML, missing key, bad value -- is a
:class:`~vmferry.errors.ConfigError` naming the profile and the key.
"""

from __future__ import annotations

import errno
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from vmferry.errors import ConfigError
from vmferry.hw.kvm import regs as R
from vmferry.hw.kvm.arm64_fw import (
    HostMitigation,
    KernelCaps,
    Wa2Semantics,
    WaLevel,
    Workaround,
)
from vmferry.hw.kvm.psci import PsciVersion

PROFILE_PACKAGE = "vmferry"
PROFILE_DIR = "profiles"


@dataclass(frozen=True)
class HostProfile:
    """One host: kernel era, architecture capabilities and (for arm64) its mitigation."""

    name: str
    arch: str
    kernel: str
    description: str
    era: str = ""
    unverified: tuple[str, ...] = ()
    caps: KernelCaps | None = None
    mitigation: HostMitigation | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def arm64(self) -> tuple[KernelCaps, HostMitigation]:
        """The arm64 description; ConfigError for a profile of another architecture."""
        if self.caps is None or self.mitigation is None:
            raise ConfigError(f"profile {self.name!r} is for arch {self.arch!r}, not arm64")
        return self.caps, self.mitigation

    def with_mitigation(self, mitigation: HostMitigation) -> HostProfile:
        """The same host with another mitigation (a host property, settable per daemon)."""
        return HostProfile(self.name, self.arch, self.kernel, self.description, self.era,
                           self.unverified, self.caps, mitigation, self.raw)


def list_profiles() -> list[str]:
    """Names of the profiles shipped with the package, sorted by kernel version."""
    folder = resources.files(PROFILE_PACKAGE) / PROFILE_DIR
    names = [p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")]
    return sorted(names, key=_version_key)


def load_profile(name: str, overrides: Mapping[str, Any] | None = None) -> HostProfile:
    """Load the shipped profile ``name``; ConfigError if unknown or invalid."""
    if name not in list_profiles():
        raise ConfigError(f"unknown host profile {name!r} (known: {', '.join(list_profiles())})")
    text = (resources.files(PROFILE_PACKAGE) / PROFILE_DIR / f"{name}.toml").read_text()
    return parse_profile(text, name, overrides)


def parse_profile(text: str, name: str = "<text>",
                  overrides: Mapping[str, Any] | None = None) -> HostProfile:
    """Parse profile TOML text (what :func:`load_profile` does after reading the file)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile {name!r}: bad TOML: {exc}") from exc
    data = _merge(data, _normalise_overrides(overrides or {}))
    arch = _get(data, name, "arch", str)
    parser = ARCH_PARSERS.get(arch)
    if parser is None:
        raise ConfigError(f"profile {name!r}: no parser for arch {arch!r}")
    return parser(data, name)


# --- arm64 --------------------------------------------------------------------------------

_FW_BY_NAME = {v: k for k, v in R.FW_REG_NAMES.items()}
_ERRNOS = {"EINVAL": errno.EINVAL, "ENOENT": errno.ENOENT}


def _parse_arm64(data: Mapping[str, Any], name: str) -> HostProfile:
    caps = _arm64_caps(data, name)
    return HostProfile(
        name=_get(data, name, "name", str),
        arch="arm64",
        kernel=_get(data, name, "kernel", str),
        description=_get(data, name, "description", str),
        era=_get(data, name, "era", str),
        unverified=tuple(_get(data, name, "unverified", list)),
        caps=caps,
        mitigation=_arm64_mitigation(_get(data, name, "mitigation", dict), name),
        raw=data,
    )


def _arm64_caps(data: Mapping[str, Any], name: str) -> KernelCaps:
    psci = _get(data, name, "psci", dict)
    fw = _get(data, name, "firmware", dict)
    bitmaps = data.get("bitmaps", {})
    try:
        fw_regs = tuple(_FW_BY_NAME[r] for r in fw["registers"])
        caps = KernelCaps(
            kernel=str(data["kernel"]),
            era=str(data["era"]),
            psci_latest=PsciVersion.parse(psci["latest"]),
            psci_settable=frozenset(PsciVersion.parse(v) for v in psci["settable"]),
            fw_regs=fw_regs,
            fw_coprocs=frozenset(R.Coproc[c] for c in fw["coprocs"]),
            unknown_fw_errno=_ERRNOS[fw["unknown_errno"]],
            smccc_1_1=bool(fw["smccc_1_1"]),
            wa_discoverable=frozenset(Workaround[w.upper()] for w in fw["discoverable"]),
            wa1_unaffected_ret=int(fw["wa1_unaffected_ret"]),
            wa2_semantics=Wa2Semantics(fw["wa2_semantics"]),
            bmap_masks={_FW_BY_NAME[k]: int(v["mask"]) for k, v in bitmaps.items()},
            bmap_defaults={_FW_BY_NAME[k]: int(v["default"]) for k, v in bitmaps.items()},
            sysregs=R.SYSREG_CATALOGUE[: int(data["sysregs"]["count"])],
            vendor_hyp_calls=bool(fw.get("vendor_hyp_calls", False)),
            system_suspend_cap=bool(fw.get("system_suspend_cap", False)),
            vcpu_features_vm_wide=bool(fw.get("vcpu_features_vm_wide", False)),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"profile {name!r}: invalid arm64 capabilities: {exc!r}") from exc
    return caps


def _arm64_mitigation(table: Mapping[str, Any], name: str) -> HostMitigation:
    try:
        return HostMitigation(
            wa1=WaLevel.parse(table["wa1"]),
            wa2=WaLevel.parse(table["wa2"]),
            wa3=WaLevel.parse(table["wa3"]),
            ssbs_everywhere=bool(table.get("ssbs_everywhere", False)),
        )
    except (KeyError, ValueError, AttributeError) as exc:
        raise ConfigError(f"profile {name!r}: invalid [mitigation]: {exc!r}") from exc


def parse_mitigation(text: str) -> HostMitigation:
    """``"avail"`` (every workaround) or ``"wa1=avail,wa2=not_required,wa3=avail[,ssbs]"``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        if len(items) == 1 and "=" not in items[0]:
            return HostMitigation.uniform(WaLevel.parse(items[0]))
        table: dict[str, Any] = {"ssbs_everywhere": "ssbs" in items}
        for item in items:
            if item != "ssbs":
                key, sep, value = item.partition("=")
                if not sep or key not in ("wa1", "wa2", "wa3"):
                    raise ValueError(f"bad item {item!r}")
                table[key] = value
        return _arm64_mitigation(table, "<mitigation>")
    except ValueError as exc:
        raise ConfigError(f"bad mitigation {text!r}: {exc}") from exc


ARCH_PARSERS: dict[str, Callable[[Mapping[str, Any], str], HostProfile]] = {
    "arm64": _parse_arm64,
}


# --- helpers ------------------------------------------------------------------------------


def _get(data: Mapping[str, Any], name: str, key: str, kind: type) -> Any:
    if key not in data:
        raise ConfigError(f"profile {name!r}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        raise ConfigError(f"profile {name!r}: key {key!r} must be {kind.__name__}")
    return value


def _normalise_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(overrides)
    level = out.get("mitigation")
    if isinstance(level, str):
        out["mitigation"] = {"wa1": level, "wa2": level, "wa3": level}
    return out


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _version_key(name: str) -> tuple[str, tuple[int, ...]]:
    prefix, _, version = name.rpartition("-")
    try:
        return prefix, tuple(int(p) for p in version.split("."))
    except ValueError:
        return name, ()
