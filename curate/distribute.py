"""Where a stage's per-unit work runs: in this process, in N local worker processes, or on a Ray cluster.

A unit-resumable stage (lexical matching today) streams its units through :func:`run_units`: a *worker* is built
once per process from ``(factory, args)`` (e.g. the lexical matcher: its automaton and taggers are built in every
worker, never sent per unit), each unit's payload goes to a worker, and the results come back **in unit order**
with at most ``window`` units in flight, so memory is bounded by the window, not by the pool, and the driver
commits each unit with its ``progress`` row exactly as a one-process run would: the catalog is the same, row
for row, from 1 process, N processes or a Ray cluster, and a killed run resumes from its committed units.

Recipe section ``distributor`` (how to run, not what comes out: it is never part of a stage's parameters):

* ``kind: local`` — ``workers`` processes (default: the recipe's ``threads``, else every core); 1 runs in this
  process. Workers are spawned (no fork of a process holding a DuckDB connection) and die with the build, even
  when it is killed with SIGKILL (:func:`die_with_parent`);
* ``kind: ray`` — one Ray actor per worker (default: the cluster's CPUs) on the cluster at ``address``
  (``auto`` = the running cluster this machine joined, ``ray://host:10001`` = a remote head), or on a Ray
  instance started here with ``workers`` CPUs when ``address`` is null. Every node needs tether installed.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Iterable, Iterator, Literal

from pydantic import Field

from tether.recipe import RecipeError, Strict

PR_SET_PDEATHSIG = 1


class DistributorConfig(Strict):
    """Recipe section ``distributor``."""

    kind: Literal["local", "ray"] = "local"
    workers: int | None = Field(None, ge=1)  # local: processes; ray: actors (None: threads / cores / cluster CPUs)
    address: str | None = None  # ray: cluster address; None: start a Ray instance in this process
    window: int | None = Field(None, ge=1)  # units in flight (None: 2 × workers)


def die_with_parent(parent_pid: int) -> None:
    """Make this process die when ``parent_pid`` (the process that started it) dies, even by SIGKILL.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere (or if prctl fails) a daemon thread that exits the
    process once its parent pid changes. Either way, a parent already gone by now means exit at once.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="tether-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def local_workers(cfg: DistributorConfig, threads: int | None = None) -> int:
    """How many local processes ``cfg`` asks for: ``workers``, else the recipe's ``threads``, else every core this
    process may run on."""
    if cfg.workers or threads:
        return int(cfg.workers or threads)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------------
# local processes
# --------------------------------------------------------------------------------------------------------
_WORKER: Callable | None = None


def _init_worker(parent_pid: int, factory: Callable, args: tuple) -> None:
    global _WORKER
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which stops the pool
    _WORKER = factory(*args)


def _call(payload: Any) -> Any:
    assert _WORKER is not None
    return _WORKER(*payload)


def _ordered(submit: Callable[[Any], Any], result: Callable[[Any], Any], items: Iterable[tuple[Any, Any]],
             window: int) -> Iterator[tuple[Any, Any]]:
    """Submit ``(key, payload)`` items with at most ``window`` in flight; yield ``(key, result)`` in item order."""
    pending: collections.deque = collections.deque()
    for key, payload in items:
        pending.append((key, submit(payload)))
        if len(pending) >= window:
            k, fut = pending.popleft()
            yield k, result(fut)
    while pending:
        k, fut = pending.popleft()
        yield k, result(fut)


def _run_local(factory: Callable, args: tuple, items: Iterable, workers: int, window: int) -> Iterator:
    if workers <= 1:
        worker = factory(*args)
        for key, payload in items:
            yield key, worker(*payload)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=(os.getpid(), factory, args))
    try:
        yield from _ordered(lambda p: pool.submit(_call, p), lambda f: f.result(), items, window)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------------
def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _run_ray(factory: Callable, args: tuple, items: Iterable, cfg: DistributorConfig, window: int | None) -> Iterator:
    if not ray_available():
        raise RecipeError("distributor.kind: ray needs Ray: pip install 'ray>=2.9' (on every node of the cluster)")
    import ray

    if cfg.address and cfg.address != "auto" and not cfg.address.startswith("ray://"):
        host, _, port = cfg.address.rpartition(":")
        try:  # fail in seconds, not after Ray's own minute of retries
            import socket

            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise RecipeError(f"distributor.address={cfg.address!r}: cannot join the Ray cluster: "
                              f"{type(e).__name__}: {e}") from None
    started = False
    if not ray.is_initialized():
        try:
            if cfg.address:
                ray.init(address=cfg.address, log_to_driver=False)
            else:
                ray.init(num_cpus=cfg.workers or None, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RecipeError(f"distributor.address={cfg.address!r}: cannot join the Ray cluster: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        started = True
    try:
        n = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))

        @ray.remote(num_cpus=1)
        class _Actor:
            def __init__(self, factory, args):
                self.worker = factory(*args)

            def run(self, payload):
                return self.worker(*payload)

        actors = [_Actor.remote(factory, args) for _ in range(n)]
        turn = iter(range(1 << 62))

        def submit(payload):
            return actors[next(turn) % n].run.remote(payload)

        try:
            yield from _ordered(submit, ray.get, items, window or 2 * n)
        finally:
            for a in actors:
                ray.kill(a)
    finally:
        if started:
            ray.shutdown()


def run_units(cfg: DistributorConfig, factory: Callable, args: tuple, items: Iterable[tuple[Any, tuple]],
              threads: int | None = None, n_items: int | None = None) -> Iterator[tuple[Any, Any]]:
    """``(key, factory(*args)(*payload))`` for every ``(key, payload)`` of ``items``, in item order, run where
    ``cfg`` says (see the module doc). ``factory`` and the payloads must be picklable (module-level names).
    ``n_items`` (when known): no more local workers than items — one unit runs in this process."""
    if cfg.kind == "ray":
        return _run_ray(factory, args, items, cfg, cfg.window)
    n = local_workers(cfg, threads)
    if n_items is not None:
        n = max(1, min(n, n_items))
    return _run_local(factory, args, items, n, cfg.window or 2 * n)
