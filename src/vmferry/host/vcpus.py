"""The threads that run a real VM's vCPUs (one per vCPU, each calling ``KVM_RUN``).

Stopping follows KVM's rules: set the vCPU's ``immediate_exit``, then send its thread a
signal that has a (no-op) handler, so a ``KVM_RUN`` in progress returns EINTR; join; then
the VM re-enters each vCPU once so KVM completes the last exit
(:meth:`vmferry.machine.x86.X86Vm.pause`).  A guest that asked to wait sleeps on an event,
which a stop also wakes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

from vmferry.errors import HostError

if TYPE_CHECKING:
    from vmferry.machine.x86 import X86Vm

log = logging.getLogger("vmferry.host.vcpus")

#: the signal that kicks a vCPU thread out of KVM_RUN
KICK = signal.SIGRTMIN + 3
JOIN_TIMEOUT_S = 5.0


def _kick_handler(signum: int, frame: FrameType | None) -> None:
    """Nothing to do: the signal's only purpose is to make KVM_RUN return EINTR."""


def install_kick_handler() -> None:
    """Install the no-op handler (main thread only; idempotent)."""
    if signal.getsignal(KICK) is _kick_handler:
        return
    if threading.current_thread() is not threading.main_thread():
        raise HostError("the vCPU kick signal handler must be installed by the main thread")
    signal.signal(KICK, _kick_handler)


def kick_handler_installed() -> bool:
    return signal.getsignal(KICK) is _kick_handler


def thread_cpu_seconds(thread: threading.Thread) -> float:
    """CPU seconds ``thread`` (of this process) used so far; 0.0 once it ended."""
    if thread.ident is None or not thread.is_alive():
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except OSError:  # it ended meanwhile
        return 0.0


class VcpuThreads:
    """One thread per vCPU of ``vm``, started by :meth:`start`, stopped by :meth:`stop`."""

    def __init__(self, vm: X86Vm) -> None:
        if not kick_handler_installed():
            install_kick_handler()
        self.vm = vm
        # a full dirty ring is harvested by the vCPU's thread, a pass by the migration's
        if isinstance(vm.kram.ring_guard, contextlib.nullcontext):
            vm.kram.ring_guard = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"vcpu{i}-{self.vm.name}",
                             daemon=True)
            for i in range(len(self.vm.kvm_vcpus))
        ]
        for t in self._threads:
            t.start()

    def _loop(self, index: int) -> None:
        try:
            while not self._stop.is_set():
                delay = self.vm.vcpu_step(index)
                if delay > 0:
                    self._stop.wait(delay)
        except Exception as exc:  # the guest crashed or KVM failed: the vCPU stops
            log.error("VM %s vCPU %d stopped: %s", self.vm.name, index, exc)

    def cpu_seconds(self) -> float:
        """CPU seconds the vCPU threads used so far (their thread CPU clocks)."""
        return sum(thread_cpu_seconds(t) for t in self._threads)

    def stop(self) -> None:
        self._stop.set()
        for i in range(len(self._threads)):
            self.vm.request_stop(i)
        for t in self._threads:
            if t.ident is not None and t.is_alive():
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pthread_kill(t.ident, KICK)
        for t in self._threads:
            t.join(JOIN_TIMEOUT_S)
            if t.is_alive():
                raise HostError(f"vCPU thread {t.name} did not stop")
        for i in range(len(self._threads)):
            self.vm.kvm_vcpus[i].immediate_exit = False
        self._threads = []
