"""Where a stage's per-unit work runs: in this process, in N local worker processes, or on a Ray cluster.

Shared by both halves (curate's matching and embedding stages, align's feature extraction). A unit-resumable
stage (lexical matching) streams its units through :func:`run_units`: a *worker* is built
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

The embedding stages (caption embedding for semantic matching and near-duplicate captions, image embedding for
SemDeDup, ``align extract``) run their frozen encoder in this process with ``kind: local`` — torch already uses
every core there — and, with ``kind: ray``, in a pool of Ray actors that each load the encoder once
(:class:`Loaded`; ``gpus`` per actor where the cluster has GPUs, the encoder then on ``cuda``). Each unit's
embeddings come back in unit order into the stage's own content-keyed cache on the driver, which then runs the
stage exactly as a local run that finds every unit cached (:func:`embed_units`); the global steps (top-k,
greedy dedup, k-means, the catalog) stay on the driver.
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
from contextlib import contextmanager
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
    gpus: float = Field(0, ge=0)  # ray: GPUs per actor of the embedding stages (0: CPU actors); encoders on cuda


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
_LIMITS: Any = None  # the worker's threadpoolctl limit, held for the process's life


def _init_worker(parent_pid: int, factory: Callable, args: tuple, threads: int) -> None:
    global _WORKER, _LIMITS
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which stops the pool
    # N workers on the machine's cores: each BLAS / OpenMP pool (spaCy's tagger → numpy → OpenBLAS) gets its share,
    # not every core each (oversubscribed spinning threads), as Ray does for its actors (OMP_NUM_THREADS)
    from threadpoolctl import threadpool_limits

    _LIMITS = threadpool_limits(limits=threads)
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
    share = max(1, local_workers(DistributorConfig()) // workers)  # this machine's cores per worker
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=(os.getpid(), factory, args, share))
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


@contextmanager
def ray_cluster(cfg: DistributorConfig) -> Iterator:
    """The Ray cluster of ``cfg`` for the ``with`` block: joined at ``cfg.address`` (checked first, so a wrong
    address fails in seconds with one line), or a Ray instance started here with ``cfg.workers`` CPUs when there is
    no address. At the end this process leaves what this call connected to (``ray.shutdown``: an instance started
    here stops, a joined cluster keeps running); a Ray already initialised in this process (``ray.init`` by the
    caller) is used as it is and left connected. Yields the ``ray`` module."""
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
    if ray.is_initialized():
        yield ray
        return
    try:
        if cfg.address:
            ray.init(address=cfg.address, log_to_driver=False)
        else:
            ray.init(num_cpus=cfg.workers or None, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RecipeError(f"distributor.address={cfg.address!r}: cannot join the Ray cluster: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _run_ray(factory: Callable, args: tuple, items: Iterable, cfg: DistributorConfig, window: int | None,
             gpus: float = 0) -> Iterator:
    with ray_cluster(cfg) as ray:
        resources = ray.cluster_resources()
        if gpus:
            if resources.get("GPU", 0) < gpus:
                raise RecipeError(f"distributor.gpus={gpus}: the Ray cluster has {resources.get('GPU', 0):g} GPUs")
            n = cfg.workers or max(1, int(resources["GPU"] // gpus))
        else:
            n = cfg.workers or max(1, int(resources.get("CPU", 1)))

        @ray.remote(num_cpus=1)
        class _Actor:
            def __init__(self, factory, args):
                self.worker = factory(*args)

            def run(self, payload):
                return self.worker(*payload)

        actors = [_Actor.options(num_gpus=gpus).remote(factory, args) for _ in range(n)]
        turn = iter(range(1 << 62))

        def submit(payload):
            return actors[next(turn) % n].run.remote(payload)

        try:
            yield from _ordered(submit, ray.get, items, window or 2 * n)
        finally:
            for a in actors:
                ray.kill(a)


def run_units(cfg: DistributorConfig, factory: Callable, args: tuple, items: Iterable[tuple[Any, tuple]],
              threads: int | None = None, n_items: int | None = None, gpus: float = 0) -> Iterator[tuple[Any, Any]]:
    """``(key, factory(*args)(*payload))`` for every ``(key, payload)`` of ``items``, in item order, run where
    ``cfg`` says (see the module doc). ``factory`` and the payloads must be picklable (module-level names).
    ``n_items`` (when known): no more local workers than items — one unit runs in this process. ``gpus``: per
    Ray actor."""
    if cfg.kind == "ray":
        return _run_ray(factory, args, items, cfg, cfg.window, gpus)
    n = local_workers(cfg, threads)
    if n_items is not None:
        n = max(1, min(n, n_items))
    return _run_local(factory, args, items, n, cfg.window or 2 * n)


# --------------------------------------------------------------------------------------------------------
# embedding stages
# --------------------------------------------------------------------------------------------------------
class Loaded:
    """A worker holding one frozen encoder, loaded once per process/actor: ``load(**kwargs)``; each unit is
    ``fn(encoder, *payload)``. ``load`` and ``fn`` are module-level callables (picklable by reference), e.g.
    ``tether.encoders.TextEncoder.load`` and the stage's own per-unit encode function — the very function its
    local path calls, so a unit's embeddings are computed the same way wherever they run."""

    def __init__(self, load: Callable, kwargs: dict, fn: Callable):
        self.encoder = load(**kwargs)
        self.fn = fn

    def __call__(self, *payload):
        return self.fn(self.encoder, *payload)


def remote_embedding(cfg: DistributorConfig | None) -> bool:
    """Whether an embedding stage sends its units to Ray actors (``kind: ray``) rather than encoding in-process."""
    return cfg is not None and cfg.kind == "ray"


def actor_load_kwargs(cfg: DistributorConfig, kwargs: dict) -> dict:
    """An encoder's load arguments as a Ray actor of ``cfg`` uses them: on ``cuda`` when it holds GPUs."""
    return {**kwargs, "device": "cuda"} if cfg.gpus else kwargs


def embed_units(cfg: DistributorConfig, load: Callable, kwargs: dict, fn: Callable,
                items: Iterable[tuple[Any, tuple]], put: Callable[[Any, Any], None], bar=None) -> int:
    """Encode every ``(key, payload)`` of ``items`` on Ray actors (:class:`Loaded` over ``load(**kwargs)``, ``cfg.gpus``
    GPUs each: ``device`` becomes ``cuda`` when > 0) and hand each result to ``put(key, result)`` on the driver, in
    item order, at most ``window`` units in flight. ``bar`` (tqdm) advances by each result's length.
    Returns the number of units encoded."""
    n = 0
    for key, result in run_units(cfg, Loaded, (load, actor_load_kwargs(cfg, kwargs), fn), items, gpus=cfg.gpus):
        put(key, result)
        if bar is not None:
            bar.update(len(result))
        n += 1
    return n
