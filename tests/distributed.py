"""Run a function on N gloo ranks over loopback (torch.multiprocessing), collecting results.

The ranks' processes are kept from one call to the next, one set per world size: a process
spawned for a call spent ~5 s of 2 cores importing torch and TorchRec, and some 40 calls in the
suite paid it. Each call starts as a newly spawned process would: the caller's environment,
working directory and sys.path (set before its function is unpickled), torch's initial seed, and
a process group of its own, TorchRec's cached node groups cleared. What a call leaves in its
processes' modules (a method registered, a warnings filter) stays for the next: no test here
asks for their absence. A call in which any rank fails ends that set (its other ranks may be
waiting in a collective); the next call spawns a new one."""

from __future__ import annotations

import atexit
import os
import pickle
import signal
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
            environ, cwd, path, port, call = conn.recv()
        except EOFError:
            return
        os.environ.clear()
        os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.chdir(cwd)
        sys.path[:] = path
        torch.manual_seed(seed)
        failed = False
        try:
            fn, args = pickle.loads(call)  # imports the function's module, on the caller's sys.path
            dist.init_process_group("gloo", rank=rank, world_size=world)
            try:
                result = pickle.dumps(("ok", fn(rank, world, *args)))
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
                _forget_torchrec_groups()
        except BaseException:  # the parent re-raises with the rank's traceback
            result, failed = pickle.dumps(("error", traceback.format_exc())), True
        try:
            conn.send_bytes(result)
        except OSError:  # the parent has given up on this set (another rank failed)
            return
        if failed:
            return


def _forget_torchrec_groups() -> None:
    """TorchRec caches its intra- and cross-node groups for the process: the next call's would
    be the destroyed group's."""
    comm = sys.modules.get("torchrec.distributed.comm")
    for name in ("_INTRA_PG", "_CROSS_PG", "_INTRA_PG_2D", "_CROSS_PG_2D", "_NODE_GROUP_SIZE_2D"):
        if comm is not None and hasattr(comm, name):
            setattr(comm, name, None)


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

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def call(self, fn: Callable[..., Any], args: tuple) -> list[Any]:
        """Each rank's result; ProcessExitedException for a rank that died, and AssertionError with
        the tracebacks of the ranks that failed (as mp.spawn raised them)."""
        task = (dict(os.environ), os.getcwd(), list(sys.path), free_port(), pickle.dumps((fn, args)))
        for conn in self.conns:
            conn.send(task)
        results: dict[int, tuple[str, Any]] = {}
        while len(results) < len(self.conns):
            pending = {self.conns[r]: r for r in range(len(self.conns)) if r not in results}
            sentinels = {self.processes[r].sentinel: r for r in pending.values()}
            ready = wait([*pending, *sentinels])
            for conn in [c for c in ready if c in pending]:
                try:
                    results[pending[conn]] = pickle.loads(conn.recv_bytes())
                except EOFError:
                    pass  # died: its sentinel says so
            for rank in sorted(sentinels[s] for s in ready if s in sentinels and sentinels[s] not in results):
                raise _exited(rank, self.processes[rank])
            errors = [value for status, value in results.values() if status == "error"]
            if errors:
                raise AssertionError("a rank failed:\n" + "\n".join(errors))
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


def _exited(rank: int, process: Any) -> mp.ProcessExitedException:
    process.join()
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        return mp.ProcessExitedException(f"process {rank} terminated with signal {name}", error_index=rank,
                                          error_pid=process.pid, exit_code=code, signal_name=name)
    return mp.ProcessExitedException(f"process {rank} terminated with exit code {code}", error_index=rank,
                                      error_pid=process.pid, exit_code=code or 0)


_KEPT: dict[int, _Ranks] = {}


@atexit.register
def _close_all() -> None:
    while _KEPT:
        _KEPT.popitem()[1].close()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """fn(rank, world, *args) on every rank; returns each rank's (picklable) result."""
    ranks = _KEPT.pop(world, None)
    if ranks is None or not ranks.alive():
        if ranks is not None:
            ranks.close(at_once=True)
        ranks = _Ranks(world)
    try:
        results = ranks.call(fn, args)
    except BaseException:
        ranks.close(at_once=True)
        raise
    _KEPT[world] = ranks
    return results
