"""Running the pending runs: a pool of worker threads, one subprocess each (one worker per visible GPU,
else CPU workers sharing the cores), output to OUT/<name>/run.log; Ctrl-C stops only its own subprocesses."""

from __future__ import annotations

import os
import queue
import shlex
import subprocess
import threading
import time

from depthfast.artifacts import read_json
from depthfast.sweep.runs import Run, command, prepare


def visible_gpus() -> list[str]:
    """GPU ids for CUDA_VISIBLE_DEVICES: the ones already visible, else torch's count (none on CPU)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch  # here: counting GPUs is the pool's only use of torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def _last_error(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines()[-200:] if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("depthfast: error:") or "Error" in line.split(":")[0]:
            return line[:200]
    return lines[-1][:200] if lines else ""


# A run's exit status when it was stopped rather than failed: 130 (its own Ctrl-C / SIGTERM handler),
# or killed by SIGINT / SIGTERM before the handler was in place.
INTERRUPTED = (130, 143, -2, -15)


class Pool:
    """N worker threads, each owning one slot (a GPU id or None) and running one subprocess at a time."""

    def __init__(self, slots: list[str | None], threads_per_run: int | None, echo) -> None:
        self.slots, self.threads_per_run, self.echo = slots, threads_per_run, echo
        self.procs: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def _run_one(self, run: Run, slot: str | None) -> None:
        prepare(run)
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        if self.threads_per_run:
            env.setdefault("OMP_NUM_THREADS", str(self.threads_per_run))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log_path = os.path.join(run.directory, "run.log")
        started = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"=== depthfast sweep: {time.strftime('%Y-%m-%d %H:%M:%S')}  {shlex.join(command(run))}"
                      f"{f'  CUDA_VISIBLE_DEVICES={slot}' if slot is not None else ''}\n")
            log.flush()
            proc = subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.procs[proc.pid] = proc
            rc = proc.wait()
            with self.lock:
                self.procs.pop(proc.pid, None)
        run.seconds = time.perf_counter() - started
        if rc == 0 and isinstance(read_json(os.path.join(run.directory, "results.json"))[0], dict):
            run.status = "ok"
        elif self.stopping or rc in INTERRUPTED:  # stopped by Ctrl-C or a signal, not by its own error
            run.status, run.note = "interrupted", "interrupted; the next sweep continues it from its checkpoint"
        else:
            run.status = "failed"
            run.note = f"exit {rc}: {_last_error(log_path)}" if rc != 0 else "exit 0 but no results.json"
        self.echo(f"[{run.status:>6}] {run.name}  ({run.seconds:.1f} s){'  ' + run.note if run.note else ''}")

    def run(self, runs: list[Run]) -> None:
        jobs: queue.Queue = queue.Queue()
        for run in runs:
            jobs.put(run)

        def worker(slot):
            while not self.stopping:
                try:
                    run = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    self._run_one(run, slot)
                except Exception as exc:  # a broken run never stops the others
                    run.status, run.note = "failed", f"{type(exc).__name__}: {exc}"
                    self.echo(f"[failed] {run.name}  {run.note}")

        threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in self.slots]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
        except KeyboardInterrupt:
            self.stopping = True
            with self.lock:
                procs = list(self.procs.values())
            for proc in procs:  # only the subprocesses this sweep started
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise


def slots_for(workers: int | None) -> tuple[list[str | None], int | None]:
    """Worker slots and threads per run: one worker per visible GPU (``workers`` caps it), else ``workers``
    CPU workers (default 1) sharing the cores evenly through OMP_NUM_THREADS."""
    gpus = visible_gpus()
    if gpus:
        n = min(workers, len(gpus)) if workers else len(gpus)
        return gpus[:n], None
    n = workers or 1
    return [None] * n, (max(1, (os.cpu_count() or 1) // n) if n > 1 else None)
