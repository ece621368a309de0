"""``lpm-update``: the post-migration device-tree update racing the nodes' users.

The ``mobility`` thread runs the guest's update-nodes walk for the stream PowerVM firmware
sends after every migration (delete the three platform-facility leaves and their
container, update two nodes, re-add the container subtree), while

* ``reader`` — user space reading ``/sys/bus/vio/devices/ibm,random-v1/devspec`` (a walk
  up the parents with counted ``of_get_parent``), or
* ``driver`` — the NX 842 driver issuing an H_COP operation through its node

use the same nodes.  Every node access is a yield point of the tree model.  In mode
``no_pf_skip`` (no seed patch) some schedule makes the reader take a reference on the
released container: a use-after-free.  In ``correct`` (the seed patch) and ``merge_readd``
every schedule passes; ``upstream`` (patched newest kernel) passes too.
"""

from __future__ import annotations

from collections.abc import Callable

from vmferry.analysis.explore.api import Case, Instance, Scenario
from vmferry.analysis.explore.fingerprint import fingerprint
from vmferry.clock import ManualClock
from vmferry.errors import InvariantViolation
from vmferry.guest.drivers import Nx842, VioBus
from vmferry.guest.mobility import MODES, MobilityHandler
from vmferry.hw.devtree.fdt import dump_fdt, load_fdt
from vmferry.hw.devtree.tree import Changeset, DeviceTree, canonical
from vmferry.hw.spapr.platform import generate_pseries_tree
from vmferry.hw.spapr.rtas import RtasFirmware, SubtreeSpec

_MODES = ("correct", "upstream", "no_pf_skip", "merge_readd")


def _platforms() -> tuple[DeviceTree, DeviceTree]:
    src = generate_pseries_tree(512, 1)
    dst = generate_pseries_tree(512, 1, numa_domain=1, shared_interrupt_pool=0xFFFFFFF1,
                                max_sync_cop_len=0x2000)
    return src, dst


def _make_dynamic(tree: DeviceTree) -> None:
    """As after an earlier migration re-added the facilities: the subtree is DYNAMIC."""
    pf = tree.find_by_path("/ibm,platform-facilities")
    assert pf is not None
    spec = SubtreeSpec.of(pf)
    tree.detach_recursive(pf)
    top = tree.new_node(spec.name, list(spec.props))
    for c in spec.children:
        child = tree.new_node(c.name, list(c.props))
        child.parent, child.sibling, top.child = top, top.child, child
    cs = Changeset(tree)
    cs.attach_subtree(top, tree.root)
    cs.apply()
    cs.destroy()


def _build(mode: str, *, dynamic: bool, user: str) -> Instance:
    src, dst = _platforms()
    tree = load_fdt(dump_fdt(src))
    if dynamic:
        _make_dynamic(tree)
    bus = VioBus(tree)
    nx = Nx842(bus)
    clock = ManualClock()
    handler = MobilityHandler(tree, RtasFirmware(src, dst), clock, MODES[mode])
    seen: list[str] = []

    def mobility() -> None:
        handler.devicetree_update(1)

    def reader() -> None:
        seen.append(bus.devspec("ibm,random-v1"))

    def driver() -> None:
        nx.compress(clock.monotonic())

    users: dict[str, Callable[[], None]] = {"reader": reader, "driver": driver}

    def check() -> None:
        tree.check_invariants()
        dangling = tree.dangling()
        if dangling:
            raise InvariantViolation(f"held nodes with a released parent: {dangling}")
        if user == "reader" and seen != ["/ibm,platform-facilities/ibm,random-v1"]:
            raise AssertionError(f"devspec read {seen}")
        if mode == "merge_readd" and canonical(tree.root) != canonical(dst.root):
            raise AssertionError("tree differs from the destination description")

    return Instance(threads={"mobility": mobility, user: users[user]}, check=check,
                    invariant=lambda: None,
                    state=lambda: fingerprint(tree, handler, bus, nx, seen, skip=(src, dst)))


def _case(name: str, description: str, *, dynamic: bool, user: str,
          fails_in: frozenset[str]) -> Case:
    return Case(name, description, lambda mode: _build(mode, dynamic=dynamic, user=user),
                fails_in)


SCENARIO = Scenario(
    name="lpm-update",
    description="post-migration update-nodes walk vs. devspec readers and the NX driver",
    modes=_MODES,
    default_mode="correct",
    cases=(
        _case("devspec-boot", "devspec read of ibm,random-v1; facilities from boot",
              dynamic=False, user="reader", fails_in=frozenset({"no_pf_skip"})),
        _case("devspec-dynamic", "devspec read; facilities re-added by an earlier migration "
              "(DYNAMIC: the container's memory is really freed)",
              dynamic=True, user="reader", fails_in=frozenset({"no_pf_skip"})),
        _case("nx-driver", "NX 842 H_COP through its node while the update runs",
              dynamic=True, user="driver", fails_in=frozenset({"no_pf_skip"})),
    ),
    preemption_bound=2,
    deterministic=frozenset({"no_pf_skip"}),
    mode_help={
        "correct": "seed patch: platform-facilities delete/add ignored by device_type",
        "upstream": "newest kernel as read (seed patch, single-node attach, no retries)",
        "no_pf_skip": "before the seed patch: container released under its vio leaves "
                      "(deterministic: every schedule fails, not a race)",
        "merge_readd": "delete+add of an unchanged phandle applied as property updates",
    },
)
