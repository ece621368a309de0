"""``iommu-probe``: the races of the IOMMU core's device probe (docs/models/iommu-probe.md §6, §8,
§11.3).

One case per race.  Each builds a fresh :class:`~vmferry.hw.iommu.kernel.Kernel` in the
requested mode, the topology of the race's schedule, and the threads of the two entry
points (``W*``: an IOMMU registering and walking the buses, then re-triggering deferred
probes; ``C``: a client driver probing with deferred retries).

Which invariants are asserted: in the v6.15 design every §11.4 invariant, after every
step and at the end; in the legacy presets only hazards (invariant 5) plus the faulty
outcome each case is about (R0: invariants 1-2, R3: invariant 7, R4: the out-of-order
default domain).  ``fails_in`` is the presence table of docs/models/iommu-probe.md
§11.3 extended to the switch modes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from vmferry.analysis.explore.api import Case, Instance, Scenario
from vmferry.analysis.explore.fingerprint import fingerprint
from vmferry.errors import InvariantViolation
from vmferry.hw.iommu.checks import check_quiescent, check_step, leaked_objects
from vmferry.hw.iommu.core import Device, device_state
from vmferry.hw.iommu.driver_core import Driver
from vmferry.hw.iommu.drivers import SmmuDriver
from vmferry.hw.iommu.dt import parse_phandle_with_args
from vmferry.hw.iommu.errors import Errno, MemoryLeak
from vmferry.hw.iommu.kernel import FULL_CHECKS, Kernel
from vmferry.hw.iommu.modes import DEFAULT_MODE, PRESETS, SWITCHES, ProbeMode
from vmferry.hw.iommu.topology import IommuHandle, client, iommu, register, register_and_trigger
from vmferry.sync import Accesses

MODES: tuple[str, ...] = (
    "v6_15",
    "global_lock",
    "pre_6_7",
    "v6_15_release",
    "pre_6_7+probe_unlocked",
    "v6_15+relock_no_recheck",
    "v6_15+no_default_domain_gate",
    "v6_15+no_ready_flag",
    "v6_15+cache_fwspec_ptr",
    "v6_15+leaky_of_xlate_driver",
    "v6_15+cleanup_overreach",
    "v6_15+cleanup_overreach+relock_no_recheck",
    "v6_15+cleanup_underreach",
)

LEGACY = frozenset({"pre_6_7", "global_lock", "pre_6_7+probe_unlocked"})


def _mode_help(mode: str) -> str:
    preset, *extra = mode.split("+")
    names = {
        "v6_15": "v6.15 design with the 6.15.1 fixes (correct)",
        "global_lock": "v6.7 ... v6.14: global probe lock around fwspec creation",
        "pre_6_7": "v6.2 ... v6.6: of_iommu_configure unlocked",
        "v6_15_release": "the v6.15 release (no re-check, no ready flag)",
    }
    text = names[preset].removesuffix(" (correct)")
    return text + "".join(f"; {SWITCHES[s][0]}" for s in extra)


@dataclass
class World:
    """A case's shared model plus the per-thread results the final check reads."""

    kernel: Kernel
    results: dict[str, int]
    handles: dict[str, IommuHandle] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], int]) -> Callable[[], None]:
        def body() -> None:
            self.results[name] = fn()

        return body


def _world(mode: str, legacy_checks: frozenset[int] = frozenset()) -> World:
    probe_mode = ProbeMode.parse(mode)
    checks = legacy_checks if probe_mode.legacy_flow else FULL_CHECKS
    return World(Kernel(probe_mode, checks=checks), {})


def _registers(handle: IommuHandle) -> Accesses:
    """A registration thread's first step: ``device_register`` sets the instance's ops."""
    return Accesses(writes=(handle.inst.key,))


#: a client thread's first step: ``probe_until_bound`` samples the deferred-trigger count
_CLIENT_START = Accesses(reads=("deferred_trigger",))


def _instance(
    world: World,
    threads: dict[str, Callable[[], int]],
    final: Callable[[], None],
    extra_invariant: Callable[[], None] | None = None,
    starts: dict[str, Hashable] | None = None,
) -> Instance:
    kernel = world.kernel

    def invariant() -> None:
        check_step(kernel)
        if extra_invariant is not None:
            extra_invariant()

    def check() -> None:
        invariant()
        check_quiescent(kernel)
        final()

    named = {name: world.run(name, fn) for name, fn in threads.items()}
    # ``starts`` (each thread's first access) is not passed on: with the registration and
    # client prologues declared, the reduction lost the v6_15+no_ready_flag failure of R0
    # that naive enumeration finds, so every thread start conflicts with everything
    del starts
    results = _Results(world.results)
    return Instance(named, invariant=invariant, check=check,
                    state=lambda: fingerprint(world.kernel, results),
                    roots=(world.kernel, results))


class _Results:
    """The threads' results for a fingerprint: in name order, not in order of finishing."""

    def __init__(self, results: dict[str, int]) -> None:
        self.results = results

    def __fingerprint__(self) -> Hashable:
        return tuple(sorted(self.results.items()))


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise InvariantViolation(message)


def _expect_probed(dev: Device, *, bound: bool) -> None:
    _expect(device_state(dev) == "S5", f"{dev.name} ends in {device_state(dev)}, not S5")
    if bound:
        _expect(dev.bound, f"{dev.name}: client driver not bound")
        _expect(dev.dma_ops == "iommu", f"{dev.name}: bound with {dev.dma_ops} DMA ops")


def _expect_walked(dev: Device) -> None:
    """After two walks a driver-less client is probed (S5) -- or, when one walk's failed
    probe freed the dev_iommu the other walk was parsing into, left in S0 for its driver
    bind to probe (a residual window of the v6.15 design, not one of the races of
    docs/models/iommu-probe.md §6)."""
    state = device_state(dev)
    _expect(state in ("S5", "S0"), f"{dev.name} ends in {state}, not S5 or S0")


def _client_thread(world: World, dev: Device) -> Callable[[], int]:
    drv = Driver(f"{dev.name}-drv")
    return lambda: world.kernel.drivers.probe_until_bound(dev, drv)


# --- R0: double probe ---------------------------------------------------------------------


def build_r0(mode: str) -> Instance:
    """Two registration walks (X, Y) both probing D, a client of X."""
    world = _world(mode, frozenset({1, 2}))
    k = world.kernel
    x, y = iommu("X"), iommu("Y")
    dev = k.place(client("D", (x, 5)))
    if k.mode.legacy_flow:
        _seed_fwspec(k, dev, x)  # C's configure ran earlier (legacy flow): fwspec exists

    def final() -> None:
        _expect_walked(dev)
        _expect(world.results == {"W1": 0, "W2": 0}, f"walk results {world.results}")

    return _instance(world, {"W1": lambda: register(k, x), "W2": lambda: register(k, y)}, final,
                     starts={"W1": _registers(x), "W2": _registers(y)})


def _seed_fwspec(k: Kernel, dev: Device, handle: IommuHandle) -> None:
    """List ``handle`` early and build D's fwspec as a client configure would have."""
    k.core.device_list.append(handle.inst)
    handle.inst.ops, handle.inst.fwnode, handle.inst.listed = handle.driver, handle.node, True
    spec = parse_phandle_with_args(dev.of_node, "iommus", "#iommu-cells", 0) \
        if dev.of_node is not None else -Errno.ENOENT
    assert not isinstance(spec, int), spec
    k.core.probe_lock.acquire()
    ret = k.core.fwspec_init(dev, handle.node)
    ret = ret or k.core.fwspec_add_ids(dev, list(spec.args))
    k.core.probe_lock.release()
    k.core.device_list.remove(handle.inst)
    handle.inst.listed = False
    assert ret == 0, ret


# --- R1 / R3: client probe against the registration walk ----------------------------------


def _iommu_of(world: World, name: str) -> IommuHandle:
    return world.handles[name]


def _client_vs_walk(mode: str, legacy_checks: frozenset[int]) -> tuple[World, Device, dict[
        str, Callable[[], int]]]:
    world = _world(mode, legacy_checks)
    k = world.kernel
    x = world.handles["X"] = iommu("X")
    dev = k.place(client("D", (x, 0x42)))
    threads = {"C": _client_thread(world, dev), "W": lambda: register_and_trigger(k, x)}
    return world, dev, threads


def _client_vs_walk_starts(world: World) -> dict[str, Hashable]:
    return {"C": _CLIENT_START, "W": _registers(_iommu_of(world, "X"))}


def build_r1(mode: str) -> Instance:
    world, dev, threads = _client_vs_walk(mode, frozenset())

    def final() -> None:
        _expect_probed(dev, bound=True)
        _expect(world.kernel.core.probe_calls.get("D") == 1, "D probed more than once")

    return _instance(world, threads, final, starts=_client_vs_walk_starts(world))


def build_r3(mode: str) -> Instance:
    world, dev, threads = _client_vs_walk(mode, frozenset({7}))
    if world.kernel.mode.legacy_flow:
        # legacy presets: C's of_iommu_configure ran first, D's fwspec exists
        # (docs/models/iommu-probe.md §6 R3)
        _seed_fwspec(world.kernel, dev, _iommu_of(world, "X"))

    def final() -> None:
        _expect_probed(dev, bound=True)
        group = dev.iommu_group
        _expect(group is not None, "D has no group")
        assert group is not None
        # a bind inside the residual window may have found no group and taken no claim
        allowed = (0, 1) if dev.bound_during_probe else (1,)
        _expect(group.owner_cnt in allowed, f"owner_cnt is {group.owner_cnt}")

    return _instance(world, threads, final, starts=_client_vs_walk_starts(world))


# --- R2: two walkers, lock dropped around dma_configure -----------------------------------


def build_r2(mode: str) -> Instance:
    world = _world(mode)
    k = world.kernel
    x, y = iommu("X"), iommu("Y")
    dev = k.place(client("D", (x, 5)))

    def final() -> None:
        _expect_walked(dev)
        _expect(world.results == {"W1": 0, "W2": 0}, f"registration results {world.results}")
        _expect(x.inst.ready and y.inst.ready, "an instance is not ready")

    return _instance(world, {"W1": lambda: register(k, x), "W2": lambda: register(k, y)}, final,
                     starts={"W1": _registers(x), "W2": _registers(y)})


# --- R4: replay runs ahead of the walk ----------------------------------------------------


def build_r4(mode: str) -> Instance:
    world = _world(mode)
    k = world.kernel
    x = iommu("X")
    others = [k.place(client("E0", (x, 10)))]
    dev = k.place(client("D", (x, 0x42)))
    threads = {"W": lambda: register_and_trigger(k, x), "C": _client_thread(world, dev)}

    def out_of_order() -> None:
        group = dev.iommu_group
        if group is not None and group.setup_path == "immediate" and group.setup_while_unready:
            raise InvariantViolation(
                f"out-of-order probe: D's default domain set up by a replay while "
                f"{', '.join(group.setup_while_unready)} was still walking"
            )

    def final() -> None:
        _expect_probed(dev, bound=True)
        if not k.mode.legacy_flow:  # legacy walks cannot parse driver-less devices
            for other in others:
                _expect_probed(other, bound=False)

    return _instance(world, threads, final, out_of_order,
                     starts={"W": _registers(x), "C": _CLIENT_START})


# --- R5: stale fwspec pointer after add_ids -----------------------------------------------


def build_r5(mode: str) -> Instance:
    world = _world(mode)
    k = world.kernel
    x = iommu("X")
    assert register(k, x) == 0
    dev = client("D", (x, 23), (x, 24))
    drv = Driver("D-drv")

    def hot_add_and_bind() -> int:
        k.drivers.device_add(dev, k.buses["platform"])
        return k.drivers.really_probe(dev, drv)

    def final() -> None:
        _expect(k.of.parsed_ids.get("D") == [23, 24], f"parsed ids {k.of.parsed_ids}")
        _expect_probed(dev, bound=True)

    return _instance(world, {"C": hot_add_and_bind}, final)


# --- §8: per-device driver data allocated in of_xlate -------------------------------------


def build_leak(mode: str) -> Instance:
    world = _world(mode)
    k = world.kernel
    sysmmu = SmmuDriver("sysmmu")  # two instances of one driver, as on Exynos
    x, y = iommu("X", driver=sysmmu), iommu("Y", driver=sysmmu)
    assert register(k, x) == 0
    dev = k.place(client("D", (x, 1), (y, 2)))
    drv = Driver("D-drv")

    def defer_twice() -> int:
        first = k.drivers.really_probe(dev, drv)
        second = k.drivers.really_probe(dev, drv)
        return first if first != -Errno.EPROBE_DEFER else second

    def final() -> None:
        _expect(world.results["C"] == -Errno.EPROBE_DEFER, f"result {world.results}")
        leaked = [r for r in leaked_objects(k) if r.kind == "driver-data"]
        if leaked:
            raise MemoryLeak(f"{len(leaked)} driver-data object(s) leaked by of_xlate")

    return _instance(world, {"C": defer_twice}, final)


# --- §11.3 cleanup_overreach / cleanup_underreach -----------------------------------------


def build_overreach(mode: str) -> Instance:
    """The walker's own configure of D fails in of_xlate (checks 50)."""
    world = _world(mode)
    k = world.kernel
    x = iommu("X")
    x.driver.fail_of_xlate[("D", 0)] = -Errno.EINVAL
    dev = k.place(client("D", (x, 7)))

    def final() -> None:
        _expect(device_state(dev) == "S0", f"D ends in {device_state(dev)}, not S0")
        _expect(world.results == {"W": 0}, f"registration result {world.results}")

    return _instance(world, {"W": lambda: register(k, x)}, final)


def build_underreach(mode: str) -> Instance:
    """An off-path configure fails on the second entry after allocating dev.iommu (check 51)."""
    world = _world(mode)
    k = world.kernel
    x = iommu("X")
    assert register(k, x) == 0
    x.driver.fail_of_xlate[("D", 1)] = -Errno.EINVAL
    dev = k.place(client("D", (x, 1), (x, 2)))
    drv = Driver("D-drv")

    def final() -> None:
        _expect(dev.iommu is None, "D keeps an empty dev_iommu after the failed configure")
        _expect(dev.bound and dev.dma_ops == "direct", "D not bound with dma-direct")

    return _instance(world, {"C": lambda: k.drivers.really_probe(dev, drv)}, final)


def _fails(*modes: str) -> frozenset[str]:
    unknown = set(modes) - set(MODES)
    assert not unknown, unknown
    return frozenset(modes)


UNLOCKED_PROBE = ("pre_6_7+probe_unlocked",)
NO_RECHECK = ("v6_15+relock_no_recheck", "v6_15_release",
              "v6_15+cleanup_overreach+relock_no_recheck")
NOT_READY = ("v6_15+no_ready_flag", "v6_15_release")
UNDERREACH = ("pre_6_7", "global_lock", "pre_6_7+probe_unlocked", "v6_15+cleanup_underreach")

CASES: tuple[Case, ...] = (
    # R0's walkers also exercise R2's and R4's bugs when those switches are on
    Case("R0", "double probe by two unlocked walkers", build_r0,
         _fails(*UNLOCKED_PROBE, *NO_RECHECK, *NOT_READY)),
    # R1 and R3 share a topology; in the v6.15 design every invariant is asserted, so the
    # R3 (default-domain gate) and R4 (ready flag) switches show up in R1 too
    Case("R1", "fwspec installed through a dev_iommu the walk freed (seed thread)", build_r1,
         _fails("pre_6_7", *UNLOCKED_PROBE, *NOT_READY, "v6_15+no_default_domain_gate")),
    Case("R2", "lock dropped around dma_configure without re-check", build_r2,
         _fails(*NO_RECHECK, *UNLOCKED_PROBE, *NOT_READY)),
    Case("R3", "client binds before the group's default domain exists", build_r3,
         _fails("pre_6_7", "global_lock", *UNLOCKED_PROBE, "v6_15+no_default_domain_gate",
                *NOT_READY)),
    Case("R4", "replay probes ahead of the registration walk", build_r4,
         _fails("pre_6_7", "global_lock", *UNLOCKED_PROBE, *NOT_READY,
                "v6_15+no_default_domain_gate")),
    Case("R5", "stale fwspec pointer after add_ids reallocation", build_r5,
         _fails("v6_15+cache_fwspec_ptr")),
    Case("leak", "of_xlate driver data leaked on deferral (§8)", build_leak,
         _fails("v6_15+leaky_of_xlate_driver", "v6_15+cleanup_underreach")),
    Case("overreach", "configure frees the walker's dev_iommu (check 50)", build_overreach,
         _fails("v6_15+cleanup_overreach+relock_no_recheck", "v6_15+leaky_of_xlate_driver")),
    Case("underreach", "configure leaves an empty dev_iommu (check 51)", build_underreach,
         _fails(*UNDERREACH, "v6_15+leaky_of_xlate_driver")),
)
assert set(PRESETS) <= {m.split("+")[0] for m in MODES}

SCENARIO = Scenario(
    name="iommu-probe",
    description="IOMMU core device probe vs registration walk: fwspec, dev->iommu, groups",
    modes=MODES,
    default_mode=DEFAULT_MODE,
    cases=CASES,
    mode_help={m: _mode_help(m) for m in MODES},
    preemption_bound=2,
    max_steps=5_000,
    dpor_state_hashing=True,
)
