"""Runs a VM's guest time in a thread: the workload dirties memory while vCPUs run.

The runner's lock is held for every slice of guest time, so :meth:`pause` returns only
once the guest has really stopped writing -- the guarantee the migration's final pass
relies on.
"""

from __future__ import annotations

import threading
import time

from vmferry.host.vcpus import thread_cpu_seconds
from vmferry.machine.vm import VM

TICK_S = 0.005


class VmRunner:
    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        # the guest's writes (this thread) and the migration's get-and-clear of the dirty
        # log (another thread) share this lock, so no dirty mark falls between the two
        vm.ram.log_guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"vm-{vm.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            with self.lock:
                self.vm.run_slice(min(now - last, 0.1))
            last = now

    # GuestControl
    def pause(self) -> None:
        with self.lock:
            self.vm.pause()

    def resume(self) -> None:
        with self.lock:
            self.vm.start()

    def set_throttle(self, pct: int) -> None:
        with self.lock:
            self.vm.workload.set_throttle(pct)

    def cpu_seconds(self) -> float:
        """CPU seconds the guest used so far: this runner's thread (a simulated guest's
        workload runs in it) and a real guest's vCPU threads."""
        return thread_cpu_seconds(self._thread) + self.vm.vcpu_cpu_seconds()

    def held(self) -> threading.Lock:
        """Guest time stands still while this is held."""
        return self.lock

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)
