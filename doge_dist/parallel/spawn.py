"""Run a function on N local CPU processes joined by gloo: the multi-process tests' ranks and
``launch/bench.py --comm``'s measurement (a launcher-free alternative to torchrun for small jobs)."""
import os
import pickle
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # by value: torch's queue would share tensors through this process's file descriptors, gone once it exits
        results.put((rank, pickle.dumps(fn(rank, world_size, *args)), None))
    except BaseException:  # report the failure (a taken port too) to the parent instead of hanging it
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    """``fn(rank, world_size, *args)`` on every rank; returns the per-rank results in rank order.
    Started once more on a new port if another process took the free port before the rendezvous."""
    try:
        return _run_once(fn, world_size, *args)
    except PortTaken:
        return _run_once(fn, world_size, *args)


class PortTaken(AssertionError):
    pass


def _next_result(results, procs, collected, poll_s: float = 0.5):
    """The next rank's (rank, value, error); a rank that ended without putting one (a segfault, the OOM
    killer, os._exit) becomes an error instead of a wait for ever. A rank puts its result before it
    exits, so an exit is only taken as a death once the queue stays empty after it."""
    while True:
        if not results.empty():
            return results.get()
        dead = [r for r, p in enumerate(procs) if r not in collected and p.exitcode is not None]
        if dead and results.empty():
            time.sleep(poll_s)  # a result put just before the exit may still be in the pipe
            if results.empty():
                return dead[0], None, f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} before returning a result"
        time.sleep(poll_s / 10)


def _run_once(fn, world_size: int, *args):
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    procs = [context.Process(target=_entry, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    collected = {}
    while len(collected) < len(procs):
        rank, value, error = _next_result(results, procs, collected)
        if error:
            for p in procs:
                p.terminate()
            failure = PortTaken if "address already in use" in error.lower() else AssertionError
            raise failure(f"rank {rank} failed:\n{error}")
        collected[rank] = pickle.loads(value)
    for p in procs:
        p.join()
    return [collected[r] for r in range(world_size)]
