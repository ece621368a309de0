"""pseries platform descriptions: the device tree a VM is created with.

:func:`generate_pseries_tree` builds a tree shaped like the one QEMU's ``pseries``
machine and PowerVM hand to a guest (root, ``chosen``, ``rtas``, ``cpus`` with cache
nodes, ``memory@0``, ``ibm,dynamic-reconfiguration-memory``, ``vdevice`` and
``ibm,platform-facilities`` with the three NX/RNG leaves of the fixture in
docs/models/pseries-mobility.md §10).  Every
node carries ``ibm,phandle`` (LoPAR requires it of every node update-nodes may report).
The *platform* keywords are what differs between hosts: NUMA associativity domain,
cache geometry, the platform-facility properties firmware may change across a move.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.errors import ConfigError
from vmferry.hw.devtree.builder import TreeBuilder
from vmferry.hw.devtree.tree import DeviceNode, DeviceTree, Property, phandle_of
from vmferry.hw.spapr.rtas import PLATFORM_FACILITIES, be32

LMB_SIZE = 256 << 20
LMB_SIZES = tuple(1 << s for s in range(24, 29))  # 16 MiB .. 256 MiB
PH_PLATFAC = 0xFFFFFFF6
PH_RANDOM = 0xFFFFFFF5
PH_COMPRESSION = 0xFFFFFFF4
PH_SYM = 0xFFFFFFF3
DRC_PLATFAC = 0x2000000A


@dataclass(frozen=True)
class PlatformParams:
    """What a host platform contributes to a guest's tree."""

    numa_domain: int = 0
    chip: int = 0
    l2_size: int = 512 * 1024
    l3_size: int = 10 * 1024 * 1024
    cache_line: int = 128
    shared_interrupt_pool: int = 0xFFFFFFF2
    max_sync_cop_len: int = 0x1000
    max_sg_len: int = 0xFF0
    platform_facilities: bool = True
    system_id: str = "IBM,02VMFERRY"
    timebase_hz: int = 512_000_000
    extra_lookup_domains: int = 0


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _p(name: str, value: bytes) -> Property:
    return Property(name, value)


class _Builder:
    def __init__(self, tree: DeviceTree) -> None:
        self.tree = tree
        self.next_ph = 0x10000001

    def node(self, parent: DeviceNode, name: str, props: list[Property],
             phandle: int | None = None) -> DeviceNode:
        ph = phandle if phandle is not None else self._alloc()
        return TreeBuilder(self.tree).add_child(parent, name,
                                                [*props, _p("ibm,phandle", be32(ph))])

    def _alloc(self) -> int:
        ph, self.next_ph = self.next_ph, self.next_ph + 1
        return ph


def generate_pseries_tree(memory_mib: int, vcpus: int, *, lmb_size: int = LMB_SIZE,
                          **platform: object) -> DeviceTree:
    """The tree a pseries VM with ``memory_mib`` MiB and ``vcpus`` CPUs boots with.

    ``platform`` keywords are the fields of :class:`PlatformParams`.  ``lmb_size`` is the
    logical memory block size (QEMU: 256 MiB; PowerVM: 16 MiB to 256 MiB, a power of
    two).  Raises :class:`ConfigError` for sizes the machine cannot have.
    """
    if lmb_size not in LMB_SIZES:
        raise ConfigError(f"LMB size {lmb_size >> 20} MiB is not one of 16..256 MiB")
    if memory_mib <= 0 or (memory_mib << 20) % lmb_size:
        raise ConfigError(
            f"memory {memory_mib} MiB is not a positive multiple of {lmb_size >> 20} MiB")
    if not 1 <= vcpus <= 1024:
        raise ConfigError(f"vcpus {vcpus} outside 1..1024")
    try:
        params = PlatformParams(**platform)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"unknown platform parameter: {exc}") from exc
    tree = DeviceTree()
    b = _Builder(tree)
    _root(tree, params)
    b.node(tree.root, "chosen", [_p("bootargs", _s("")), _p("linux,stdout-path",
                                                            _s("/vdevice/vty@71000000"))])
    _rtas(b, tree.root, params)
    _cpus(b, tree.root, vcpus, params)
    _memory(b, tree.root, memory_mib, params, lmb_size)
    _vdevice(b, tree.root)
    if params.platform_facilities:
        _platform_facilities(b, tree.root, params)
    return tree


def _assoc(params: PlatformParams, *tail: int) -> bytes:
    cells = [0, 0, params.chip, params.numa_domain, *tail]
    return be32(len(cells), *cells)


def _root(tree: DeviceTree, params: PlatformParams) -> None:
    TreeBuilder(tree).set_root_properties((
        _p("compatible", _s("qemu,pseries")), _p("model", _s("IBM pSeries (emulated)")),
        _p("#address-cells", be32(2)), _p("#size-cells", be32(2)),
        _p("system-id", _s(params.system_id)), _p("ibm,phandle", be32(0x10000000))))


def _rtas(b: _Builder, root: DeviceNode, params: PlatformParams) -> None:
    domains = params.numa_domain + 1 + params.extra_lookup_domains
    b.node(root, "rtas", [
        _p("ibm,associativity-reference-points", be32(4, 2)),
        _p("ibm,max-associativity-domains", be32(4, 0, 0, domains, domains)),
        _p("rtas-size", be32(0x2000)),
        _p("ibm,current-associativity-domains", be32(4, 0, 0, domains, domains)),
    ])


def _cpus(b: _Builder, root: DeviceNode, vcpus: int, params: PlatformParams) -> None:
    cpus = b.node(root, "cpus", [_p("#address-cells", be32(1)), _p("#size-cells", be32(0))])
    l3 = b.node(cpus, "l3-cache@3000", [
        _p("device_type", _s("cache")), _p("cache-unified", b""),
        _p("d-cache-size", be32(params.l3_size)), _p("i-cache-size", be32(params.l3_size)),
        _p("d-cache-line-size", be32(params.cache_line))])
    l2 = b.node(cpus, "l2-cache@2000", [
        _p("device_type", _s("cache")), _p("cache-unified", b""),
        _p("d-cache-size", be32(params.l2_size)), _p("i-cache-size", be32(params.l2_size)),
        _p("d-cache-line-size", be32(params.cache_line)),
        _p("l2-cache", be32(phandle_of(l3)))])
    for i in range(vcpus):
        b.node(cpus, f"PowerPC,POWER9@{i}", [
            _p("device_type", _s("cpu")), _p("reg", be32(i)),
            _p("ibm,my-drc-index", be32(0x10000000 + i)),
            _p("timebase-frequency", be32(params.timebase_hz)),
            _p("clock-frequency", be32(1_000_000_000)),
            _p("d-cache-line-size", be32(params.cache_line)),
            _p("slb-size", be32(32)),
            _p("ibm,associativity", _assoc(params, i)),
            _p("l2-cache", be32(phandle_of(l2)))])


def _memory(b: _Builder, root: DeviceNode, memory_mib: int, params: PlatformParams,
            lmb_size: int) -> None:
    b.node(root, "memory@0", [
        _p("device_type", _s("memory")), _p("reg", be32(0, 0, 0, lmb_size)),
        _p("ibm,associativity", _assoc(params))])
    lmbs = (memory_mib << 20) // lmb_size
    dyn = bytearray(be32(lmbs))
    for i in range(lmbs):
        addr = i * lmb_size
        dyn += be32(addr >> 32, addr & 0xFFFFFFFF, 0x80000000 + i, 0, params.numa_domain, 0x8)
    nd = params.numa_domain + 1 + params.extra_lookup_domains
    lookup = be32(nd, 4, *[c for d in range(nd) for c in (0, 0, params.chip, d)])
    b.node(root, "ibm,dynamic-reconfiguration-memory", [
        _p("ibm,lmb-size", be32(0, lmb_size)),
        _p("ibm,associativity-lookup-arrays", lookup),
        _p("ibm,dynamic-memory", bytes(dyn))])


def _vdevice(b: _Builder, root: DeviceNode) -> None:
    vdev = b.node(root, "vdevice", [
        _p("device_type", _s("vdevice")), _p("compatible", _s("IBM,vdevice")),
        _p("#address-cells", be32(1)), _p("#size-cells", be32(0))])
    b.node(vdev, "vty@71000000", [
        _p("device_type", _s("serial")), _p("compatible", _s("hvterm1")),
        _p("reg", be32(0x71000000)), _p("ibm,loc-code", _s("U8957.MT1.VMFERRY-V1-C0"))])


def _platform_facilities(b: _Builder, root: DeviceNode, params: PlatformParams) -> None:
    """The fixture of docs/models/pseries-mobility.md §10; phandles as logged in the seed thread."""
    pool = be32(params.shared_interrupt_pool)
    cop = params.max_sync_cop_len
    pf = b.node(root, PLATFORM_FACILITIES, [
        _p("name", _s(PLATFORM_FACILITIES)), _p("device_type", _s(PLATFORM_FACILITIES)),
        _p("#address-cells", be32(1)), _p("#size-cells", be32(0)),
        _p("ibm,my-drc-index", be32(DRC_PLATFAC)),
        _p("ibm,max-async-ops-per-processor", be32(4))], PH_PLATFAC)
    leaves = [
        ("ibm,random-v1", "ibm,random", 0, b"", None, PH_RANDOM),
        ("ibm,compression-v1", "ibm,compression", 1,
         be32(1, cop, 0x1FE, 1, cop, 0x1FE), params.max_sg_len, PH_COMPRESSION),
        ("ibm,sym-encryption-v1", "ibm,sym-encryption", 2,
         be32(0, 0, 3, 128, cop, 0x1FE, 192, cop, 0x1FE, 256, cop, 0x1FE),
         params.max_sg_len, PH_SYM),
    ]
    for name, compat, rid, sync_cop, sg, ph in leaves:
        props = [_p("name", _s(name)), _p("compatible", _s(compat)), _p("status", _s("okay")),
                 _p("ibm,resource-id", be32(rid))]
        if sg is not None:
            props.append(_p("ibm,max-sg-len", be32(sg)))
        props += [_p("ibm,max-sync-cop", sync_cop), _p("ibm,shared-interrupt-pool", pool)]
        b.node(pf, name, props, ph)


def assign_phandles(tree: DeviceTree, base: int = 0x30000000) -> int:
    """Give every node lacking one an ``ibm,phandle`` (QEMU trees carry few); returns count.

    Deterministic: nodes are numbered in pre-order.  Existing phandles are kept.
    """
    used = {phandle_of(n) for n in tree.walk()}
    build = TreeBuilder(tree)
    next_ph, added = base, 0
    for n in tree.walk():
        if phandle_of(n):
            continue
        while next_ph in used:
            next_ph += 1
        build.set_property(n, Property("ibm,phandle", be32(next_ph)))
        used.add(next_ph)
        added += 1
    return added
