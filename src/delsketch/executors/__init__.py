"""Executors: one interface for every farm of independent, deterministic jobs.

A farm is ``fn(task, *args)`` over a list of argument tuples (sketch chunks, leave-one-out retrains, shadow
models). A job is a pure function of the task (named by its fingerprint), its arguments (which carry its id
and seed) and nothing else, so any executor computes the same bytes and one executor can finish another's
partial work: jobs whose result is already on disk are left out by the caller before the farm starts.

* :class:`InProcess` (``"local"``): in this process, in order.
* :class:`ProcessPool` (``"process"``): ``workers`` spawned processes on this machine, one torch thread each;
  they end with their parent (a watchdog thread in each worker notices a dead parent within a second).
* :class:`RayExecutor` (``"ray"``, ``"ray://HOST:PORT"``): tasks on a Ray cluster; ``"ray"`` joins the
  cluster named by ``RAY_ADDRESS`` or starts a local runtime, ``"ray://..."`` joins that cluster (Ray
  client). A job whose worker dies (killed, node lost) is retried up to ``max_retries`` times; an exception
  raised by the job itself is deterministic and is not retried. Ray is imported only by this executor.

Workers rebuild the task by calling a picklable zero-argument ``factory`` (``delsketch.tasks.factory(spec)``
for a preset, ``functools.partial(delsketch.tasks.load_task_file, "file.py:function")`` for a user's task);
a worker whose rebuilt task has another fingerprint refuses to compute. Jobs may report progress within
themselves with :func:`job_progress`; the local executors pass it on, Ray reports finished jobs only.

This package imports only ``delsketch.io``/``delsketch.version`` (and torch to set worker threads).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Optional, Sequence, Union

__all__ = ["Executor", "InProcess", "ProcessPool", "RayExecutor", "ExecutorError", "get_executor", "job_progress",
           "EXECUTORS", "ResultStore", "map_stored"]

EXECUTORS = ("local", "process", "ray", "ray://HOST:PORT")

Factory = Callable[[], Any]
OnResult = Callable[[int, Any], None]
OnProgress = Callable[[int, float], None]


class ExecutorError(ValueError):
    """A farm cannot run: bad executor settings, a factory that rebuilds another task, a worker lost for good."""


# ----------------------------------------------------------------------------------------------
# progress inside a job
# ----------------------------------------------------------------------------------------------

_hook = threading.local()


def job_progress(units: float) -> None:
    """Called by a running job: ``units`` of its own work are done (cumulative). A no-op where nobody listens."""
    cb = getattr(_hook, "cb", None)
    if cb is not None:
        cb(units)


def _run_job(k: int, fn, task, args, cb: Optional[Callable[[float], None]]):
    _hook.cb = cb
    try:
        return fn(task, *args)
    finally:
        _hook.cb = None


# ----------------------------------------------------------------------------------------------
# the task in a worker
# ----------------------------------------------------------------------------------------------

_TASKS: dict = {}  # (factory, fingerprint) -> task, per worker process (Ray reuses its workers)


def _task_for(factory: Factory, fingerprint: Optional[str]):
    key = (repr(factory), fingerprint)  # two factories may build tasks of one fingerprint that act differently
    if key in _TASKS:
        return _TASKS[key]
    task = factory()
    if fingerprint is not None and task.fingerprint() != fingerprint:
        raise ExecutorError("a worker rebuilt a different task from the factory (fingerprints differ): it would "
                            "compute another task's results")
    _TASKS.clear()  # one task per worker at a time
    _TASKS[key] = task
    return task


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


# ----------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------


class Executor:
    """Runs ``fn(task, *job)`` for every job; see the module docstring."""

    name = "executor"
    #: whether jobs run outside this process (then a picklable ``factory`` is required)
    remote = False

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple], *, task: Any = None, factory: Optional[Factory] = None,
            on_result: Optional[OnResult] = None, on_progress: Optional[OnProgress] = None) -> list:
        """The results ``[fn(task, *job) for job in jobs]`` in job order. ``on_result(k, result)`` is called in
        this process as job ``k`` finishes (in completion order: record it there, so a killed run keeps it);
        ``on_progress(k, units)`` when job ``k`` reports progress of its own (:func:`job_progress`).

        ``task`` is the driver's task (used in-process; its fingerprint is what workers must rebuild);
        ``factory`` rebuilds it in workers (required by executors that run jobs elsewhere)."""
        jobs = [tuple(j) for j in jobs]
        if not jobs:
            return []
        if task is None and factory is None:
            raise ExecutorError("a farm needs the task or a factory that builds it")
        if self.remote:
            if factory is None:
                raise ExecutorError(f"executor {self.name!r} runs jobs in other processes, which rebuild the task: "
                                    "pass a picklable factory (delsketch.tasks.factory(spec) for a preset, or "
                                    "'--task file.py:function' / delsketch.tasks.load_task_file for your own task)")
            if task is None:
                task = factory()
            fingerprint = task.fingerprint()
            if factory().fingerprint() != fingerprint:
                raise ExecutorError("the factory does not rebuild this task (fingerprints differ): the workers "
                                    "would compute another task's results")
        else:
            fingerprint = None
            if task is None:
                task = factory()
        return self._map(fn, jobs, task, factory, fingerprint, on_result or (lambda k, r: None),
                         on_progress or (lambda k, u: None))

    def _map(self, fn, jobs, task, factory, fingerprint, on_result, on_progress) -> list:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class InProcess(Executor):
    """Every job in this process, in order (the reference the others are byte-identical to)."""

    name = "local"

    def _map(self, fn, jobs, task, factory, fingerprint, on_result, on_progress) -> list:
        out = []
        for k, job in enumerate(jobs):
            r = _run_job(k, fn, task, job, lambda u, _k=k: on_progress(_k, u))
            out.append(r)
            on_result(k, r)
        return out


# ----------------------------------------------------------------------------------------------
# local worker processes
# ----------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)  # the parent died (even by SIGKILL): so does this worker, mid-job or not


def _pool_init(factory: Factory, fingerprint: str, queue, threads: Optional[int], parent: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    _set_threads(threads)
    try:  # an initializer that raises breaks the pool with an unhelpful message: report it at the first job
        task, error = _task_for(factory, fingerprint), None
    except Exception as e:  # noqa: BLE001
        task, error = None, e
    _WORKER.update(task=task, queue=queue, error=error)


def _pool_job(k: int, fn, args):
    if _WORKER["error"] is not None:
        raise _WORKER["error"]
    q = _WORKER["queue"]
    return _run_job(k, fn, _WORKER["task"], args, lambda u: q.put((k, u)))


class ProcessPool(Executor):
    """``workers`` spawned processes on this machine, one torch thread each unless ``threads`` says otherwise.

    Spawned, so a script that uses it needs the usual ``if __name__ == "__main__":`` guard. The numbers are those
    of :class:`InProcess` with the same number of torch threads."""

    name = "process"
    remote = True

    def __init__(self, workers: Optional[int] = None, threads: Optional[int] = 1):
        workers = (os.cpu_count() or 1) if workers is None else int(workers)
        if workers < 1:
            raise ExecutorError(f"workers must be at least 1, got {workers}")
        self.workers, self.threads = workers, threads

    def describe(self) -> str:
        return f"process ({self.workers} workers)"

    def _map(self, fn, jobs, task, factory, fingerprint, on_result, on_progress) -> list:
        import multiprocessing as mp
        import queue as queue_mod
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        out: list = [None] * len(jobs)
        pending: set = set()
        ex = ProcessPoolExecutor(min(self.workers, len(jobs)), mp_context=ctx, initializer=_pool_init,
                                 initargs=(factory, fingerprint, q, self.threads, os.getpid()))
        try:
            futures = {ex.submit(_pool_job, k, fn, job): k for k, job in enumerate(jobs)}
            pending = set(futures)

            def drain():
                while True:
                    try:
                        k, u = q.get_nowait()
                    except (queue_mod.Empty, OSError, ValueError):
                        return
                    on_progress(k, u)

            while pending:
                ready, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                drain()
                for f in ready:
                    k = futures[f]
                    out[k] = f.result()
                    on_result(k, out[k])
        except BaseException:  # Ctrl-C, SIGTERM or a failed job: stop the other workers now, not after their jobs
            for f in pending:
                f.cancel()
            for proc in list((getattr(ex, "_processes", None) or {}).values()):
                proc.terminate()
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            ex.shutdown(wait=True)
            q.close()
            q.join_thread()
        return out


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------


def _ray_job(factory: Factory, fingerprint: str, threads: Optional[int], k: int, fn, args):
    _set_threads(threads)
    return _run_job(k, fn, _task_for(factory, fingerprint), args, None)


class RayExecutor(Executor):
    """Jobs as Ray tasks.

    ``address``: ``None`` - join the cluster in ``RAY_ADDRESS`` if set, else start a local runtime with
    ``workers`` CPUs (default: this machine's cores) and stop it afterwards; ``"ray://HOST:PORT"`` (Ray client)
    or ``"HOST:PORT"``/``"auto"`` - join that cluster. A Ray runtime already initialized in this process is
    used as it is. ``workers`` also bounds the jobs in flight (default: no bound, the cluster schedules).
    ``max_retries``: how often a job whose worker process died is run again (bounded; exceptions raised by the
    job are not retried). ``threads``: torch threads per job (default 1; ``None`` leaves them). ``num_cpus`` /
    ``num_gpus``: resources each job asks for. ``runtime_env``: Ray's, for a runtime this executor starts or
    joins (e.g. ``{"py_modules": [delsketch]}`` on a cluster whose nodes lack delsketch)."""

    name = "ray"
    remote = True

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None, max_retries: int = 3,
                 threads: Optional[int] = 1, num_cpus: float = 1, num_gpus: float = 0,
                 runtime_env: Optional[dict] = None):
        if workers is not None and int(workers) < 1:
            raise ExecutorError(f"workers must be at least 1, got {workers}")
        if int(max_retries) < 0:
            raise ExecutorError(f"max_retries must be 0 or more, got {max_retries}")
        self.address = address
        self.workers = None if workers is None else int(workers)
        self.max_retries, self.threads, self.num_cpus, self.num_gpus = int(max_retries), threads, num_cpus, num_gpus
        self.runtime_env = runtime_env

    def describe(self) -> str:
        where = self.address or os.environ.get("RAY_ADDRESS") or "local runtime"
        return f"ray ({where})"

    def _connect(self):
        """``(ray, started)``: the module and whether this call started the runtime (then it stops it)."""
        try:
            import ray
        except ImportError:
            raise ExecutorError("executor 'ray' needs Ray: pip install 'delsketch[ray]'") from None
        if ray.is_initialized():
            return ray, False
        import logging

        address = self.address or os.environ.get("RAY_ADDRESS") or None
        kw: dict = dict(logging_level=logging.WARNING, log_to_driver=False)
        if self.runtime_env:
            kw["runtime_env"] = self.runtime_env
        if address is None:
            kw.update(num_cpus=self.workers or os.cpu_count() or 1, include_dashboard=False)
        try:
            ray.init(address=address, **kw)
        except Exception as e:  # noqa: BLE001 - connection failures come in many types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if address and "RAY_AUTH_MODE" not in os.environ:
                msg += " (a cluster started by 'ray start' checks a token: set RAY_AUTH_MODE=token here)"
            raise ExecutorError(f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'}: {msg}") from None
        return ray, True

    def _map(self, fn, jobs, task, factory, fingerprint, on_result, on_progress) -> list:
        ray, started = self._connect()
        from ray import exceptions as rex

        out: list = [None] * len(jobs)
        inflight: dict = {}
        try:
            remote = ray.remote(_ray_job).options(max_retries=self.max_retries, retry_exceptions=False,
                                                  num_cpus=self.num_cpus, num_gpus=self.num_gpus)
            fref = ray.put(factory)
            waiting = list(enumerate(jobs))
            limit = self.workers or len(jobs)
            while waiting or inflight:
                while waiting and len(inflight) < limit:
                    k, job = waiting.pop(0)
                    inflight[remote.remote(fref, fingerprint, self.threads, k, fn, job)] = k
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    k = inflight.pop(ref)
                    try:
                        out[k] = ray.get(ref)
                    except rex.RayTaskError as e:  # the job raised: re-raise the job's own exception
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, BaseException):
                            raise cause from None
                        raise
                    except rex.RayError as e:  # the worker or its node died more often than max_retries allows
                        tries = self.max_retries + 1
                        raise ExecutorError(f"job {k}: its Ray worker died on each of {tries} tr{'ies' if tries > 1 else 'y'} "
                                            f"(max_retries={self.max_retries}): {type(e).__name__}") from None
                    on_result(k, out[k])
        except BaseException:
            for ref in list(inflight):
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass
            raise
        finally:
            if started:
                ray.shutdown()
        return out


# ----------------------------------------------------------------------------------------------
# results on disk: a farm that resumes
# ----------------------------------------------------------------------------------------------


def _hash_value(h, v) -> None:
    import torch

    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    elif isinstance(v, (list, tuple)):
        h.update(f"L{len(v)}|".encode())
        for x in v:
            _hash_value(h, x)
    elif isinstance(v, dict):
        h.update(f"D{len(v)}|".encode())
        for k in sorted(v):
            h.update(f"{k}|".encode())
            _hash_value(h, v[k])
    elif v is None or isinstance(v, (bool, int, float, str)):
        h.update(f"{type(v).__name__}:{v!r}|".encode())
    else:
        raise ExecutorError(f"a stored farm's job arguments must be tensors, numbers, strings or lists of them, "
                            f"not {type(v).__name__}")


def _flatten(r, prefix: str, out: dict):
    """A result of tensors / numbers / tuples / lists / dicts as flat tensors and a JSON structure."""
    import torch

    if isinstance(r, torch.Tensor):
        out[prefix] = r.detach().cpu().contiguous()
        return "t"
    if isinstance(r, bool):
        return ["b", r]
    if isinstance(r, (int, float)):
        out[prefix] = torch.tensor(r, dtype=torch.float64 if isinstance(r, float) else torch.int64)
        return "f" if isinstance(r, float) else "i"
    if isinstance(r, (list, tuple)):
        return ["l" if isinstance(r, list) else "u", [_flatten(x, f"{prefix}.{i}", out) for i, x in enumerate(r)]]
    if isinstance(r, dict):
        return ["d", {k: _flatten(v, f"{prefix}.{k}", out) for k, v in r.items()}]
    raise ExecutorError(f"a stored farm's results must be tensors, numbers, lists or dicts, not {type(r).__name__}")


def _unflatten(shape, prefix: str, t: dict):
    if shape == "t":
        return t[prefix]
    if shape == "f":
        return float(t[prefix])
    if shape == "i":
        return int(t[prefix])
    kind, body = shape
    if kind == "b":
        return body
    if kind in ("l", "u"):
        items = [_unflatten(x, f"{prefix}.{i}", t) for i, x in enumerate(body)]
        return items if kind == "l" else tuple(items)
    return {k: _unflatten(v, f"{prefix}.{k}", t) for k, v in body.items()}


def _digest(tensors: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        _hash_value(h, k)
        _hash_value(h, tensors[k])
    return h.hexdigest()


class ResultStore:
    """Each job's result in its own file ``DIR/job-<key>.safetensors``, written atomically as the job finishes;
    ``key`` = sha256 of (task fingerprint, the job function's name, the job's arguments). A file is used instead
    of running the job only if its tensors hash to the digest stored inside it and it carries that key, so a farm
    killed halfway, or run by another executor, resumes with the same results; anything else is recomputed."""

    def __init__(self, directory, fingerprint: str, fn):
        from pathlib import Path

        self.dir = Path(directory)
        self.fingerprint, self.fn = fingerprint, f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)}"

    def key(self, job: tuple) -> str:
        import hashlib

        h = hashlib.sha256(f"{self.fingerprint}|{self.fn}|".encode())
        _hash_value(h, list(job))
        return h.hexdigest()

    def path(self, job: tuple):
        return self.dir / f"job-{self.key(job)[:32]}.safetensors"

    def load(self, job: tuple):
        """``(True, result)`` if a verified result of ``job`` is stored, else ``(False, None)``."""
        import json

        p = self.path(job)
        if not p.is_file():
            return False, None
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(p), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("delsketch", "{}"))
            t = load_file(p)
            if meta.get("key") != self.key(job) or meta.get("digest") != _digest(t):
                return False, None
            return True, _unflatten(json.loads(meta["shape"]), "r", t)
        except Exception:  # noqa: BLE001 - damaged or foreign: recomputed
            return False, None

    def save(self, job: tuple, result) -> None:
        import json

        from ..io import atomic_save_tensors

        tensors: dict = {}
        shape = _flatten(result, "r", tensors)
        atomic_save_tensors(self.path(job), tensors, {"key": self.key(job), "digest": _digest(tensors),
                                                      "shape": json.dumps(shape), "fn": self.fn})


def map_stored(executor: "Executor", fn, jobs: Sequence[tuple], store, *, task=None, factory=None,
               on_result: Optional[OnResult] = None) -> list:
    """:meth:`Executor.map` whose results are kept in ``store`` (a directory): jobs with a verified stored
    result are not run again (see :class:`ResultStore`)."""
    jobs = [tuple(j) for j in jobs]
    if task is None:
        task = factory()
    rs = ResultStore(store, task.fingerprint(), fn)
    rs.dir.mkdir(parents=True, exist_ok=True)
    out: list = [None] * len(jobs)
    todo = []
    for k, job in enumerate(jobs):
        ok, r = rs.load(job)
        if ok:
            out[k] = r
            if on_result:
                on_result(k, r)
        else:
            todo.append(k)

    def done(i, r):
        k = todo[i]
        rs.save(jobs[k], r)
        out[k] = r
        if on_result:
            on_result(k, r)

    executor.map(fn, [jobs[k] for k in todo], task=task, factory=factory, on_result=done)
    return out


# ----------------------------------------------------------------------------------------------
# by name
# ----------------------------------------------------------------------------------------------


def get_executor(spec: Union[str, Executor, None] = None, workers: Optional[int] = None, **kw) -> Executor:
    """An executor from its name: ``"local"``, ``"process"``, ``"ray"`` or ``"ray://HOST:PORT"`` (``None``:
    local with one worker, process with more). ``workers``: processes / Ray CPUs (``0`` or ``None``: one per
    core for ``process``)."""
    if isinstance(spec, Executor):
        return spec
    if spec is None:
        spec = "local" if workers is None or workers == 1 else "process"
    spec = str(spec).strip()
    if workers is not None and int(workers) < 0:
        raise ExecutorError(f"workers must be 0 (one per core) or more, got {workers}")
    w = int(workers) if workers else None
    if spec == "local":
        if w not in (None, 1):
            raise ExecutorError("executor 'local' runs one job at a time: use 'process' for more workers")
        return InProcess()
    if spec == "process":
        return ProcessPool(w, **kw)
    if spec == "ray":
        return RayExecutor(None, w, **kw)
    if spec.startswith("ray://"):
        if len(spec) <= len("ray://"):
            raise ExecutorError("executor 'ray://HOST:PORT' needs a host and port")
        return RayExecutor(spec, w, **kw)
    raise ExecutorError(f"unknown executor {spec!r} (choose from: {', '.join(EXECUTORS)})")
