"""The default CPU thread count: physical cores this process may use, less the ones other work keeps busy.

    default_threads() -> int >= 1

llama.cpp defaults to the number of physical cores (hyper-threads share one core's vector units, so a
second thread per core only adds synchronization). On a shared machine that is not enough: decode
splits every matmul across the threads and waits for the slowest, so one thread descheduled by
another process stalls the step (measured on a 2-core machine with two other jobs running: `-t 2`
decoded 4x slower than `-t 1`). So the default also subtracts the cores the 1-minute load average
says are taken: max(1, physical - round(load)). The load average lags by about a minute and counts
this process's own past work when called late; it is read once, when a model is loaded. `-t`
overrides it.
"""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (Linux sysfs), else os.cpu_count()."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                pkg = f.read().strip()
            with open(base + "core_id") as f:
                core = f.read().strip()
        except OSError:
            return len(cpus) or 1
        cores.add((pkg, core))
    return len(cores) or 1


def busy_cores() -> int:
    """Cores other processes keep busy, from the 1-minute load average (0 where there is none)."""
    try:
        return round(os.getloadavg()[0])
    except (OSError, AttributeError):
        return 0


def default_threads() -> int:
    n = physical_cores()
    return max(1, min(n, n - busy_cores()))
