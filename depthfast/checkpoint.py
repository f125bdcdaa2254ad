"""Checkpoints a killed run resumes from, bit for bit.

Layout inside the run directory:
    checkpoint-<step>/model.safetensors   the fine-tuned weights (θ_step)
    checkpoint-<step>/state.pt            optimizer, scheduler, training log, step, fingerprint
    checkpoint-<step>/rng-rank<r>.pt      the RNG states of process r
    checkpoint.json                       {"step": k, "dir": "checkpoint-<k>", "fingerprint": …}

A checkpoint directory is complete before checkpoint.json points at it (the pointer is replaced
atomically), and older checkpoints are removed only after that. θ₀ is not saved: it is the
pretrained model, reloaded from its path with the same seed (the fresh head included), and its
fingerprint is checked on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys

import numpy as np
import torch

from depthfast.artifacts import atomic_write_json
from depthfast.distributed import full_state_dict
from depthfast.errors import DepthfastError, os_error_line
from depthfast.rundir import apply_modes

POINTER = "checkpoint.json"


IGNORED = {"out", "device", "checkpoint_every", "keep_checkpoints", "measure_at", "tensorboard",
           "no_memory_check", "no_objective_distance", "overwrite"}
START_FRESH = "run without --resume (or with --overwrite) to start fresh, or delete the directory"


def relevant_config(config: dict) -> dict:
    """The fields that decide the training trajectory (not where results go or what is logged)."""
    return {k: v for k, v in sorted(config.items()) if k not in IGNORED}


def config_fingerprint(config: dict) -> str:
    """Hash of the fields that decide the training trajectory (not where results go or what is logged)."""
    return hashlib.sha256(json.dumps(relevant_config(config), sort_keys=True).encode()).hexdigest()[:16]


def config_differences(saved: dict, current: dict) -> list[str]:
    """"name saved → current" for each trajectory field that differs (the checkpoint's first)."""
    saved, current = relevant_config(saved), relevant_config(current)
    return [f"{k} {saved.get(k, '(unset)')!r} → {current.get(k, '(unset)')!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """Checksum of every parameter (float64 sum and sum of squares, computed where the weights are),
    to check that θ₀ reloads identically on resume without copying the weights to the host."""
    sums = [torch.stack([p.double().sum(), p.double().square().sum()]) for _, p in sorted(model.state_dict().items())]
    values = torch.stack(sums).cpu().numpy() if sums else np.zeros(0)
    return hashlib.sha256(values.tobytes()).hexdigest()[:16]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str, step: int, model: torch.nn.Module, optimizer, scheduler, log_state: dict,
                    fingerprint: str, rank: int = 0, is_main: bool = True, barrier=lambda: None,
                    sharded: bool = False, config: dict | None = None) -> bool:
    """Write checkpoint-<step>/ completely, then point checkpoint.json at it, then drop the previous one;
    True when written.

    Under several processes every rank calls this: the main one writes weights and optimizer state
    (replicated under DDP; gathered into full state dicts, collectively, under FSDP2), each rank its
    own RNG state (dropout draws differ per rank). ``config`` (the run's fields) goes into the pointer,
    so that a refused resume can name the settings that differ. A checkpoint that cannot be written (a
    full disk, no permission) is a warning, its partial directory removed: the run goes on to its results,
    it only cannot resume from this step.
    """
    try:
        return _save_checkpoint(out, step, model, optimizer, scheduler, log_state, fingerprint, rank, is_main,
                                barrier, sharded, config)
    except OSError as exc:
        shutil.rmtree(os.path.join(out, f".checkpoint-{step}.partial"), ignore_errors=True)
        reason = os_error_line(exc) or f"{type(exc).__name__}: {exc}"
        print(f"depthfast: warning: checkpoint at step {step} not written ({reason}); the run goes on, "
              "resumable only from an earlier checkpoint", file=sys.stderr)
        return False


def _save_checkpoint(out, step, model, optimizer, scheduler, log_state, fingerprint, rank, is_main, barrier,
                     sharded, config) -> bool:
    from safetensors.torch import save_file, save_model

    name = f"checkpoint-{step}"
    final = os.path.join(out, name)
    staging = os.path.join(out, f".{name}.partial")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = full_state_dict(model)
        optimizer_state = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        weights, optimizer_state = None, optimizer.state_dict()
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        if weights is None:
            save_model(model, os.path.join(staging, "model.safetensors"))  # handles tied weights
        else:  # tied weights appear under both names; safetensors wants no shared storage
            save_file({k: v.clone().contiguous() for k, v in weights.items()},
                      os.path.join(staging, "model.safetensors"))
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "log": log_state, "fingerprint": fingerprint}, os.path.join(staging, "state.pt"))
    barrier()
    torch.save(rng_state(), os.path.join(staging, f"rng-rank{rank}.pt"))
    barrier()
    if is_main:
        apply_modes(staging)  # as the umask says, like every artifact
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        previous = _pointer_or_none(out)
        pointer = {"step": step, "dir": name, "fingerprint": fingerprint}
        if config is not None:
            pointer["config"] = relevant_config(config)
        atomic_write_json(os.path.join(out, POINTER), pointer)
        if previous and previous["dir"] != name:
            shutil.rmtree(os.path.join(out, previous["dir"]), ignore_errors=True)
    barrier()
    return True


def read_pointer(out: str) -> dict | None:
    path = os.path.join(out, POINTER)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            pointer = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DepthfastError(f"checkpoint pointer {path} is unreadable ({exc}); {START_FRESH}") from None
    missing = [k for k in ("step", "dir", "fingerprint") if not isinstance(pointer, dict) or k not in pointer]
    if missing:
        raise DepthfastError(f"checkpoint pointer {path} is damaged (no {', '.join(repr(k) for k in missing)}); "
                             f"{START_FRESH}")
    return pointer


def load_checkpoint(out: str, model: torch.nn.Module, optimizer, scheduler, fingerprint: str,
                    rank: int = 0, sharded: bool = False, config: dict | None = None) -> tuple[int, dict]:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns (step, training-log state).

    Refusals name what is wrong: the settings that differ from the checkpoint's (``config``, the run's
    fields, against the pointer's), a checkpoint directory that is gone, damaged weights."""
    from safetensors.torch import load_model

    pointer = read_pointer(out)
    if pointer is None:
        raise DepthfastError(f"no checkpoint to resume from in {out}")
    if pointer["fingerprint"] != fingerprint:
        differ = config_differences(pointer["config"], config) if config is not None and isinstance(
            pointer.get("config"), dict) else []
        what = (f"settings differ (checkpoint → this run): {'; '.join(differ)}" if differ else
                "the same settings, but the pretrained weights differ (the model changed on disk?)"
                if config is not None and isinstance(pointer.get("config"), dict) else
                f"fingerprint {pointer['fingerprint']}, this run {fingerprint}")
        raise DepthfastError(f"checkpoint in {out} comes from another config ({what}); resume with the same "
                             f"settings, or {START_FRESH}")
    directory = os.path.join(out, pointer["dir"])
    if not os.path.isdir(directory):
        raise DepthfastError(f"checkpoint.json in {out} points at {pointer['dir']}/, which is missing (deleted?); "
                             f"{START_FRESH}")
    rng_file = os.path.join(directory, f"rng-rank{rank}.pt")
    if not os.path.exists(rng_file):
        if not os.path.exists(os.path.join(directory, "rng-rank0.pt")):
            raise DepthfastError(f"checkpoint {directory} is incomplete (no rng-rank0.pt); {START_FRESH}")
        raise DepthfastError(f"checkpoint {directory} was written by fewer processes; resume with the same number")
    try:
        state = torch.load(os.path.join(directory, "state.pt"), weights_only=False)
        rng = torch.load(rng_file, weights_only=False)
        if sharded:
            from safetensors.torch import load_file
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, load_file(os.path.join(directory, "model.safetensors")), options=options)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"], options=options)
        else:
            load_model(model, os.path.join(directory, "model.safetensors"))
            optimizer.load_state_dict(state["optimizer"])
    except Exception as exc:  # OSError, RuntimeError, safetensors' SafetensorError, unpickling errors
        if isinstance(exc, DepthfastError):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DepthfastError(f"checkpoint {directory} is damaged ({text}); {START_FRESH}") from None
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rng)
    return state["step"], state["log"]


def _pointer_or_none(out: str) -> dict | None:
    """The pointer, or None where there is none or it is damaged (a fresh run replaces it)."""
    try:
        return read_pointer(out)
    except DepthfastError:
        return None


def remove_checkpoints(out: str) -> None:
    pointer = _pointer_or_none(out)
    if pointer:
        shutil.rmtree(os.path.join(out, pointer["dir"]), ignore_errors=True)
    if os.path.exists(os.path.join(out, POINTER)):
        os.unlink(os.path.join(out, POINTER))
