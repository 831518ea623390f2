"""How many CPUs this process may use: shared by the data tools' worker counts and the trainer's thread split."""
import os


def usable_cpus() -> int:
    """The CPUs this process may run on, the default worker and thread count: ``os.cpu_count()`` is every
    core of the machine, also under Slurm's --cpus-per-task or taskset, where as many workers as
    cores crowd onto the few allowed. (No ``sched_getaffinity`` on macOS: all cores there.)"""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
