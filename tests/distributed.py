"""Run a function on N gloo ranks over loopback (torch.multiprocessing), collecting results.

The ranks' processes are kept from one call to the next, one set per world size: a process
spawned for a call spent ~5 s of 2 cores importing torch and TorchRec, and some 40 calls in the
suite paid it. Each call starts as a newly spawned process would: the caller's environment,
working directory and sys.path, torch's initial seed and a process group of its own. A call in
which any rank fails ends that set (its other ranks may be waiting in a collective); the next call
spawns a new one."""

from __future__ import annotations

import atexit
import os
import socket
import sys
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, conn: Connection) -> None:
    """A rank's process: runs each call sent to it until the parent goes or a call fails."""
    seed = torch.initial_seed()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        except BaseException:  # the function's module failed to import here
            conn.send(("error", traceback.format_exc()))
            return
        fn, args, port, environ, cwd, path = task
        os.environ.clear()
        os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.chdir(cwd)
        sys.path[:] = path
        torch.manual_seed(seed)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            result = ("ok", fn(rank, world, *args))
        except BaseException:  # the parent re-raises with the rank's traceback
            result = ("error", traceback.format_exc())
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        conn.send(result)
        if result[0] == "error":
            return


class _Ranks:
    """`world` processes running `_serve`, each at the end of a pipe."""

    def __init__(self, world: int) -> None:
        context = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes = []
        for rank in range(world):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(rank, world, theirs), name=f"rank-{rank}")
            process.start()
            theirs.close()
            self.conns.append(ours)
            self.processes.append(process)

    def call(self, fn: Callable[..., Any], args: tuple) -> list[Any]:
        """Each rank's result; AssertionError with the tracebacks of the ranks that failed, and
        ProcessExitedException for a rank that died (as mp.spawn raised)."""
        task = (fn, args, free_port(), dict(os.environ), os.getcwd(), list(sys.path))
        for conn in self.conns:
            conn.send(task)
        results: dict[int, tuple[str, Any]] = {}
        while len(results) < len(self.conns):
            pending = {self.conns[r]: r for r in range(len(self.conns)) if r not in results}
            sentinels = {self.processes[r].sentinel: r for r in pending.values()}
            ready = wait([*pending, *sentinels])
            for conn in [c for c in ready if c in pending]:
                try:
                    results[pending[conn]] = conn.recv()
                except EOFError:
                    pass  # died: its sentinel says so
            errors = [value for status, value in results.values() if status == "error"]
            if errors:
                raise AssertionError("a rank failed:\n" + "\n".join(errors))
            for rank in [sentinels[s] for s in ready if s in sentinels and sentinels[s] not in results]:
                process = self.processes[rank]
                process.join()
                raise mp.ProcessExitedException(f"process {rank} terminated with exit code {process.exitcode}",
                                                error_index=rank, error_pid=process.pid,
                                                exit_code=process.exitcode or 0)
        return [results[r][1] for r in range(len(self.conns))]

    def close(self, at_once: bool = False) -> None:
        """Idle ranks return as their pipe closes; `at_once`, after a failed call, kills them
        (some may wait in a collective for a rank that has gone)."""
        for conn in self.conns:
            conn.close()
        for process in self.processes:
            process.join(timeout=0 if at_once else 5)
            if process.is_alive():
                process.kill()
                process.join()


_KEPT: dict[int, _Ranks] = {}


@atexit.register
def _close_all() -> None:
    while _KEPT:
        _KEPT.popitem()[1].close()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """fn(rank, world, *args) on every rank; returns each rank's (picklable) result."""
    ranks = _KEPT.pop(world, None) or _Ranks(world)
    try:
        results = ranks.call(fn, args)
    except BaseException:
        ranks.close(at_once=True)
        raise
    _KEPT[world] = ranks
    return results
