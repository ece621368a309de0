"""The hypervisor's side of partition suspend: H_JOIN, H_PROD, ibm,suspend-me and VASI.

Theory of operation
-------------------
A migrating pseries partition parks every CPU but one with H_JOIN; the last active CPU
gets H_CONTINUE and calls ``ibm,suspend-me``.  :class:`PartitionHypervisor` models what the
guest can observe of that, with the hypercall numbers and return codes of LoPAR/PAPR:

* ``h_join(cpu, irqs_enabled)`` -- H_BAD_MODE with interrupts enabled; the CPU that makes
  every online CPU joined gets H_CONTINUE at once; any other parks (blocks, through
  :func:`vmferry.sync.wait_until`) until an H_PROD wakes it with H_SUCCESS -- a prod the
  guest did not intend (a paravirt spinlock kick) wakes it just the same;
* ``h_prod(cpu)``;
* ``ibm_suspend_me(stream)`` -- RTAS status from a script (0 = suspended and resumed on
  the destination);
* ``h_vasi_state(stream)`` -- (return code, VASI state) from a script, the last entry
  repeating; ``h_vasi_signal(stream, code, reason)`` records what the guest signalled.

Scripts make every path reachable: failing suspends, a stream that leaves SUSPENDING, an
H_VASI_STATE the hypervisor does not implement (H_FUNCTION) or a session already cleaned
up (H_PARAMETER).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from vmferry.sync import wait_until, yield_point

H_SUCCESS = 0
H_CONTINUE = 18
H_HARDWARE = -1
H_FUNCTION = -2
H_PARAMETER = -4
H_BAD_MODE = -5


class VasiState(enum.IntEnum):
    INVALID = 0
    ENABLED = 1
    ABORTED = 2
    SUSPENDING = 3
    SUSPENDED = 4
    RESUMED = 5
    COMPLETED = 6


class VasiSignal(enum.IntEnum):
    CANCEL = 1
    ABORT = 2
    SUSPEND = 3
    COMPLETE = 4
    ENABLE = 5
    FAILOVER = 6


#: RTAS ibm,suspend-me statuses the guest can see
SUSPEND_OK = 0
SUSPEND_CANCELLED = 9000
SUSPEND_MULTIPLE_THREADS = -9005  # other threads still active: try again
SUSPEND_NOT_SUSPENDABLE = -9004
SUSPEND_OUTSTANDING_COP_OPS = -9006


@dataclass(eq=False)  # identity: shared state the explorer tracks
class PartitionHypervisor:
    """What one partition sees of its hypervisor during suspend (see the module doc)."""

    ncpus: int
    suspend_statuses: Sequence[int] = (SUSPEND_OK,)
    vasi_script: Sequence[tuple[int, VasiState]] = ((H_SUCCESS, VasiState.SUSPENDING),)
    joined: set[int] = field(default_factory=set)
    prodded: set[int] = field(default_factory=set)
    suspend_calls: list[tuple[int, int]] = field(default_factory=list)  # (cpu, stream)
    signals: list[tuple[int, int, int]] = field(default_factory=list)  # (stream, code, reason)
    vasi_polls: int = 0
    stray_prods: int = 0
    _suspends: int = 0

    # --- H_JOIN / H_PROD -------------------------------------------------------------

    def h_join(self, cpu: int, irqs_enabled: bool) -> int:
        yield_point(f"H_JOIN cpu{cpu}", self, write=True)
        if irqs_enabled:
            return H_BAD_MODE
        self.joined.add(cpu)
        if len(self.joined) == self.ncpus:  # the sole remaining active thread
            self.joined.discard(cpu)
            return H_CONTINUE
        wait_until(f"cpu{cpu} joined", lambda: cpu in self.prodded)
        self.prodded.discard(cpu)
        self.joined.discard(cpu)
        return H_SUCCESS

    def h_prod(self, cpu: int) -> int:
        if not 0 <= cpu < self.ncpus:
            return H_PARAMETER
        yield_point(f"H_PROD cpu{cpu}", self, write=True)
        self.prodded.add(cpu)
        return H_SUCCESS

    def stray_prod(self, cpu: int) -> None:
        """A wake-up the migration code did not send (paravirt spinlock kick, NMI)."""
        self.stray_prods += 1
        self.h_prod(cpu)

    # --- ibm,suspend-me --------------------------------------------------------------

    def ibm_suspend_me(self, cpu: int, stream: int) -> int:
        yield_point("ibm,suspend-me", self, write=True)
        self.suspend_calls.append((cpu, stream))
        status = self.suspend_statuses[min(self._suspends, len(self.suspend_statuses) - 1)]
        self._suspends += 1
        return status

    # --- VASI ------------------------------------------------------------------------

    def h_vasi_state(self, stream: int) -> tuple[int, VasiState]:
        entry = self.vasi_script[min(self.vasi_polls, len(self.vasi_script) - 1)]
        self.vasi_polls += 1
        return entry

    def h_vasi_signal(self, stream: int, code: int, reason: int) -> int:
        if code != VasiSignal.CANCEL:  # the only signal a partition may send
            return H_PARAMETER
        self.signals.append((stream, code, reason))
        return H_SUCCESS
