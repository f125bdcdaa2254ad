"""One run directory, owned by one run, never holding a mix of two: the ``--out`` of ``run``, ``compare``,
the Trainer callback and every run of a sweep.

``RunDir(path, …).open()`` at start, before any model is loaded, checks that the path is a directory or
can be created, that a file can be created in it, and (``check_space``) that the disk has room for the
checkpoints and artifacts the config implies; it takes an exclusive lock (``fcntl.flock`` on
``.depthfast.lock`` inside the directory, holding pid, host and start time) for the run's life, so a
second run on the same directory is refused with one line naming the holder. The kernel drops a flock
when its process dies, so the lock of a killed run is stale by construction and simply taken over.
A finished run (results.json present) is refused unless ``overwrite``.

Publishing: the first artifact written (any file of ``ARTIFACTS``, through ``depthfast.artifacts``'
atomic writers, or ``model/``) first retracts the old results.json, then removes the older run's other
artifacts; results.json is written last and carries ``manifest`` {file: sha256} of every artifact, which
``verify_manifest`` (depthfast report, depthfast compare) checks. So a reader finds either a whole old run,
or no results.json, or a whole new run.

Fault injection for tests: ``DEPTHFAST_FAULT_KILL_AT=n`` ends the process with ``os._exit(137)`` at the
n-th point of the publishing window (``fault_point``; points are counted before the retraction, after it,
and before and after each artifact write).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import sys
import time

# the publishing hooks live with the atomic writers (depthfast.artifacts, a leaf)
from depthfast.artifacts import _ACTIVE, ARTIFACTS, RESULTS, atomic_write_json, fault_point, file_mode
from depthfast.errors import INTERRUPTED_LINE, DepthfastError, os_error_line

LOCK = ".depthfast.lock"
# Working state that is neither an artifact nor a result: never removed by publishing, never in a manifest.
WORKING = (LOCK, "checkpoint.json", "run.log", "tensorboard")


def apply_modes(path: str) -> None:
    """Give a written tree (model/, a checkpoint) the umask's modes: some writers (safetensors, tempfile)
    create 0600 files and 0700 directories."""
    os.chmod(path, file_mode(directory=True))
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), file_mode(directory=True))
        for name in files:
            os.chmod(os.path.join(root, name), file_mode())


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(directory: str) -> list[str]:
    """Paths (relative, '/'-separated) of every artifact file in ``directory``: ARTIFACTS and model/'s files."""
    found = []
    for name in ARTIFACTS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            found.append(name)
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for file in sorted(files):
                    found.append(os.path.relpath(os.path.join(root, file), directory).replace(os.sep, "/"))
    return found


def manifest_of(directory: str) -> dict[str, str]:
    """{artifact file: sha256} of what is in ``directory`` now (results.json's ``manifest``)."""
    return {name: sha256_of(os.path.join(directory, name)) for name in artifact_files(directory)}


def verify_manifest(directory: str, results: dict) -> str:
    """"" when the artifacts in ``directory`` are those results.json's manifest lists, else a short reason
    (the first file changed, or not from this run). A listed file that is absent is no mix (a copy of
    the run without its model/, say) and passes; results from before the manifest existed pass too."""
    manifest = results.get("manifest") if isinstance(results, dict) else None
    if manifest is None:
        return ""
    if not isinstance(manifest, dict):
        return "manifest is not a mapping"
    for name, digest in sorted(manifest.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if sha256_of(path) != digest:
            return f"{name} differs from the manifest (written by another run?)"
    extra = sorted(set(artifact_files(directory)) - set(manifest))
    if extra:
        return f"{extra[0]} is not in the manifest (left by another run?)"
    return ""


class RunDir:
    """The output directory of one run (see the module docstring). ``what`` names it in messages
    ("--out", "the Trainer callback's out")."""

    def __init__(self, path: str, overwrite: bool = False, resume: bool = False, what: str = "--out",
                 refuse_finished: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.shown = path
        self.overwrite, self.resume, self.what = overwrite, resume, what
        self.refuse_finished = refuse_finished
        self.fd: int | None = None
        self.publishing = False
        self.created = False  # made by check(): removed again by close() if nothing was written into it

    # ---- start ---------------------------------------------------------------------------------------

    def check(self) -> "RunDir":
        """The path is a directory (or can be made one) and writable, and holds no finished run unless
        ``overwrite``: refused with one line, nothing written."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise DepthfastError(f"{self.what} {self.shown!r} is a file, not a directory; choose a directory")
        try:
            self.created = self.created or not os.path.exists(self.path)
            os.makedirs(self.path, exist_ok=True)
            probe = os.path.join(self.path, f".depthfast-write-test.{os.getpid()}")
            with open(probe, "wb") as f:
                f.write(b"x")
            os.unlink(probe)
        except OSError as exc:
            line = os_error_line(exc, self.shown)
            raise DepthfastError(line or f"cannot write {self.what} {self.shown!r}: {exc.strerror or exc}") from None
        if self.refuse_finished and not self.overwrite and os.path.exists(os.path.join(self.path, RESULTS)):
            raise DepthfastError(f"{self.what} {self.shown!r} holds a finished run (results.json); pass --overwrite "
                                 "to replace it, or choose another directory")
        return self

    def open(self) -> "RunDir":
        """check(), then the lock, held until close()."""
        self.check()
        self.lock()
        _ACTIVE[self.path] = self
        return self

    def lock(self) -> None:
        import fcntl

        path = os.path.join(self.path, LOCK)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise DepthfastError(f"{self.what} {self.shown!r} is in use by another run ({holder}); wait for it, "
                                     "or choose another directory") from None
            # The holder before us may have removed the file as it released it: then our lock is on an
            # unlinked file that nobody else sees, so take the lock again on the current one.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        text = f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        self.fd = fd

    def check_space(self, need: int, what: str = "checkpoints and artifacts") -> None:
        """Refuse when the disk holding the directory has less than ``need`` bytes free."""
        from depthfast.memory import human_bytes  # here: rundir loads before torch (__main__, Ctrl-C)

        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            return
        if need > free:
            raise DepthfastError(f"{self.what} {self.shown!r}: the {what} need about {human_bytes(need)} and the disk "
                                 f"has {human_bytes(free)} free; free some space, choose another directory, or "
                                 "write fewer checkpoints (--checkpoint-every 0)")

    # ---- publishing ----------------------------------------------------------------------------------

    def begin_publish(self) -> None:
        """Before the first artifact: retract the older results.json, then remove the older run's other
        artifacts and stale temporary files (once per run)."""
        if self.publishing:
            return
        self.publishing = True
        fault_point()
        results = os.path.join(self.path, RESULTS)
        if os.path.exists(results):
            os.unlink(results)
            _fsync_dir(self.path)
        fault_point()
        for name in os.listdir(self.path):
            path = os.path.join(self.path, name)
            stale_tmp = name.startswith(".") and (name.endswith(".tmp") or name.startswith(".model."))
            if name in ARTIFACTS or stale_tmp:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass

    def close(self) -> None:
        """Release the lock (and remove its file: a directory left by a finished run holds only the run);
        a directory this run created and left empty (refused input) is removed: nothing of it is left."""
        _ACTIVE.pop(self.path, None)
        if self.fd is not None:
            try:
                os.unlink(os.path.join(self.path, LOCK))
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        if self.created:
            try:
                os.rmdir(self.path)  # only if empty
            except OSError:
                pass

    def __enter__(self) -> "RunDir":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def publish_results(out: str, results: dict) -> dict:
    """Write results.json last, with the manifest of every artifact beside it; returns ``results``
    (the manifest added)."""
    results["manifest"] = manifest_of(out)
    atomic_write_json(os.path.join(out, RESULTS), results)
    return results


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_need(weights_bytes: int, cfg) -> int:
    """Bytes a run writes at most, from its model's fp32 weight bytes: two checkpoints at a time (the
    new one is complete before the old one goes), each weights + optimizer states; the saved model;
    8 MiB for the small artifacts."""
    from depthfast.memory import optimizer_states  # here: rundir loads before torch (see check_space)

    need = 8 << 20
    if getattr(cfg, "checkpoint_every", 0) and cfg.checkpoint_every < cfg.steps:
        need += 2 * weights_bytes * (1 + optimizer_states(cfg))
    if getattr(cfg, "save_model", False):
        need += weights_bytes
    return need


def weights_bytes_of(model_config, objective: str = "cls") -> int | None:
    """fp32 bytes of the model's parameters, from its config on the meta device (nothing is loaded);
    None when the config does not build."""
    try:
        import torch  # here: rundir loads before torch and transformers (__main__, Ctrl-C)
        import transformers

        loader = transformers.AutoModelForMaskedLM if objective == "mlm" else (
            transformers.AutoModelForCausalLM if objective == "clm" else transformers.AutoModel)
        with torch.device("meta"):
            model = loader.from_config(model_config)
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * 4
    except Exception:  # an estimate only: a config that does not build is checked later, by loading
        return None


def _exit_130(signum, frame) -> None:
    """Ctrl-C / SIGTERM: the command's one line, exit 130, now. Not a KeyboardInterrupt: raised in Python
    code that C++ called (a pybind11 binding while torch imports, an autograd hook) it ends in
    std::terminate, exit −6 (seen under load 0.6 s after start). Stopping here is as safe as kill -9,
    which the run already survives (atomic artifacts, atomic checkpoints, a lock the kernel releases)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: the line below still goes to fd 2
            pass
    os.write(2, f"depthfast: {INTERRUPTED_LINE['text']}\n".encode())
    os._exit(130)


def interrupt_exits_130() -> None:
    """For a command's __main__: Ctrl-C (or SIGTERM from a sweep or a scheduler) at any moment, imports
    included, ends with one line and exit status 130 instead of a traceback (``_exit_130``). A command
    that stops its own workers on Ctrl-C (sweep) calls ``interrupts_raise`` once it starts."""
    import signal

    try:
        signal.signal(signal.SIGINT, _exit_130)
        signal.signal(signal.SIGTERM, _exit_130)
    except ValueError:  # not the main thread
        pass
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print("depthfast: interrupted", file=sys.stderr)
            sys.stderr.flush()
            os._exit(130)
        previous(kind, value, tb)

    sys.excepthook = hook


def interrupts_raise() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt again (for the sweep, which stops its runs and writes
    its summary when interrupted). Only where ``interrupt_exits_130`` installed the hard exit: a caller's
    own handlers (a test, a notebook) stay as they are."""
    import signal

    if signal.getsignal(signal.SIGINT) is not _exit_130:
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass
