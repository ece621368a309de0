"""The guest's ``ibm,update-properties`` client (``update_dt_node``).

Per updated node the guest asks firmware for pages of property descriptors and applies
them; a value split over several pages is collected until its final chunk.  In
``correct`` mode each page is bounds-checked and parsed whole before any change, and a
chunk for another name while a value is pending is refused.
"""

from __future__ import annotations

from vmferry.guest.mobility.core import (
    HOLDER,
    Change,
    MobilityCore,
    OutOfBoundsRead,
    PendingValue,
    SharedBufferCorruption,
)
from vmferry.hw.devtree.tree import DeviceNode, Property
from vmferry.hw.spapr.workarea import (
    MIGRATION_SCOPE,
    UPDATE_PROPS_HEADER,
    VD_DELETE,
    WORK_AREA_SIZE,
    Rc,
    UpdatePropsField,
    WorkArea,
    WorkAreaError,
    WorkAreaOverrun,
)


class UpdatePropertiesClient(MobilityCore):
    """``ibm,update-properties`` for one node at a time."""

    def update_node(self, node: DeviceNode) -> None:
        if "ibm,update-properties" not in self.tokens:
            self.report.errors.append("ibm,update-properties missing")
            return
        buf = bytearray(WORK_AREA_SIZE)
        wa = WorkArea(buf)
        wa.set_u32(UpdatePropsField.PHANDLE, node.phandle)
        pending: PendingValue | None = None
        while True:
            rc = self._call(lambda: self._props_call(buf))
            if rc >= 0 and wa.u32(UpdatePropsField.PHANDLE) != node.phandle:
                raise SharedBufferCorruption(
                    f"update-properties for {node.path()} ({node.phandle:#x}) came back "
                    f"describing phandle {wa.u32(UpdatePropsField.PHANDLE):#x}")
            if rc < 0:
                self.report.warnings.append(f"update-properties {node.path()}: rc {rc}")
                break
            try:
                descs = self._parse_props(wa)
            except WorkAreaError as exc:
                self.report.rejections.append(exc)
                self.report.errors.append(f"update-properties {node.path()}: {exc}")
                return
            pending = self._apply_descs(node, descs, pending)
            if rc != Rc.MORE:
                break
        if pending is not None:
            self._abandon_partial(node, pending)

    def _props_call(self, buf: bytearray) -> int:
        def call(b: bytearray) -> int:
            return self.rtas.update_properties(b, MIGRATION_SCOPE)
        return call(buf) if self.data_buf is None else self.data_buf.call(call, buf)

    def _abandon_partial(self, node: DeviceNode, pending: PendingValue) -> None:
        if self.opts.partial_name_check:
            self.report.errors.append(
                f"{node.path()}: stream ended inside split value of {pending.name!r}; dropped")
        else:
            self.report.leaked_partials += 1

    def _parse_props(self, wa: WorkArea) -> list[tuple[str, int, bytes]]:
        """One page of descriptors (path descriptor skipped), parsed whole or rejected."""
        n = self._u32(wa, UpdatePropsField.COUNT)
        off = UPDATE_PROPS_HEADER
        out: list[tuple[str, int, bytes]] = []
        for _ in range(n):
            if self._byte(wa, off) == 0 and not out:
                vd = self._u32(wa, off + 1)
                self._check_span(off + 5, vd)
                off += 5 + vd
                continue
            name = self._cstr(wa, off)
            off += len(name) + 1
            vd = self._u32(wa, off)
            off += 4
            length = 0 if vd in (0, VD_DELETE) else (
                (-vd) & 0xFFFFFFFF if vd & 0x80000000 else vd)
            self._check_span(off, length)
            out.append((name, vd, bytes(wa.buf[off:off + length])))
            off += length
        return out

    def _byte(self, wa: WorkArea, off: int) -> int:
        self._check_span(off, 1)
        return wa.buf[off]

    def _cstr(self, wa: WorkArea, off: int) -> str:
        if not self.opts.bounds_check:
            self._check_span(off, 1)
            end = wa.buf.find(b"\0", off)
            if end < 0:
                raise OutOfBoundsRead(f"property name runs past the work area at {off:#x}")
            return wa.buf[off:end].decode("latin-1")
        return wa.cstr(off)

    def _check_span(self, off: int, n: int) -> None:
        if off < 0 or off + n > WORK_AREA_SIZE:
            if self.opts.bounds_check:
                raise WorkAreaOverrun(f"descriptor of {n} bytes crosses the work area end",
                                      off)
            raise OutOfBoundsRead(f"update-properties parser read {n} bytes at {off:#x}, "
                                  "beyond the 4096-byte work area")

    def _apply_descs(self, node: DeviceNode, descs: list[tuple[str, int, bytes]],
                     pending: PendingValue | None) -> PendingValue | None:
        for name, vd, value in descs:
            if vd == 0:
                continue
            if vd == VD_DELETE:
                pending = None
                if node.prop(name, HOLDER) is not None:
                    self.tree.remove_property(node, name)
                    self.report.changes.append(Change("remove-property", node.path(), name))
                continue
            pending = self._update_property(node, pending, name, vd, value)
        return pending

    def _update_property(self, node: DeviceNode, pending: PendingValue | None, name: str,
                         vd: int, value: bytes) -> PendingValue | None:
        more = bool(vd & 0x80000000)
        if pending is not None:
            if self.opts.partial_name_check and pending.name != name:
                self.report.errors.append(
                    f"{node.path()}: chunk for {name!r} while {pending.name!r} was pending;"
                    " both dropped")
                return None
            pending.value += value
        else:
            pending = PendingValue(name, bytearray(value))
        if more:
            return pending
        self.tree.update_property(node, Property(pending.name, bytes(pending.value)))
        self.report.changes.append(Change("update-property", node.path(), pending.name))
        return None
