"""Checkpoints: a directory of safetensors files (all tensors) and meta.json (everything else).

    checkpoints/
      step_000100/   model.safetensors  [ema.safetensors]  optimizer.safetensors  rng.safetensors
                     meta.json  config.yaml
      last -> step_000100      best -> step_000080      (symlinks)

A checkpoint is written into a hidden ``.step_N.tmp`` directory, every file is fsynced, and
the directory is renamed into place: the rename is the commit point, so a reader never sees a
half-written checkpoint. ``last``/``best`` are symlinks swapped with os.replace (also atomic).
Nothing is unpickled on load: safetensors and JSON only. Every file is checked before use
(:func:`validate`: meta.json parses, each safetensors header and length is whole), and errors
name the file; :func:`latest` skips a corrupt checkpoint, with a warning, for an older one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d+)$")
# What Trainer.save writes to meta.json; resuming needs all of it, evaluation only train_state.
RESUME_KEYS = ("train_state", "optimizer", "scheduler", "scaler", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped for an older one."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage: give each its own contiguous copy.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def write_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict, extra_files: dict[str, str] | None = None) -> Path:
    """Atomically create root/step_N from {file stem: tensors}, meta.json and text files."""
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(step)
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, group in tensors.items():
        save_file(_cpu(group), str(tmp / f"{stem}.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for fname, text in (extra_files or {}).items():
        (tmp / fname).write_text(text)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved again (e.g. a re-run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    return final


def point(root: Path, link: str, target: Path) -> None:
    """Atomically make root/link a relative symlink to target (a directory inside root)."""
    tmp = root / f".{link}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, root / link)
    _fsync(root)


def prune(root: Path, keep_last: int) -> None:
    """Delete step checkpoints beyond the newest ``keep_last``, never the targets of last/best."""
    pinned = {(root / link).resolve() for link in ("last", "best") if (root / link).is_symlink()}
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    for _, path in steps[: max(0, len(steps) - keep_last)]:
        if path.resolve() not in pinned:
            shutil.rmtree(path)


def remove_partial(root: Path) -> None:
    """Leftovers of a save that was killed before its commit."""
    if root.is_dir():
        for p in root.glob(".*.tmp"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def step_dirs(root: Path) -> list[Path]:
    """Committed step directories, newest first."""
    if not root.is_dir():
        return []
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()), reverse=True)
    return [p for _, p in steps]


def latest(root: Path) -> Path | None:
    """The newest committed step directory whose files are whole (a commit is atomic, so it is
    at least as new as the one ``last`` points to). A corrupt newer one is skipped with a
    CheckpointWarning naming the bad file."""
    for path in step_dirs(root):
        try:
            validate(path)
        except CheckpointError as e:
            warnings.warn(f"skipping the corrupt checkpoint {path}: {e}", CheckpointWarning, stacklevel=2)
            continue
        return path.resolve()
    return None


def resolve(path: str | Path) -> Path:
    """A validated checkpoint directory from itself, a checkpoints/ folder, or a run directory
    (its newest valid checkpoint)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "meta.json").exists():
            validate(candidate)
            return candidate.resolve()
        if (found := latest(candidate)) is not None:
            return found
    raise FileNotFoundError(f"no checkpoint at {path} (expected a step_N directory, a checkpoints/ folder or a run directory)")


def read_meta(path: Path, keys: tuple[str, ...] = ("train_state",)) -> dict:
    """meta.json, checked to be whole and to hold ``keys``."""
    f = path / "meta.json"
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (not a checkpoint directory, or an incomplete one)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f}: not readable JSON, the file is truncated or corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in keys if k not in meta]
    state = meta.get("train_state")
    if "train_state" not in missing and not (isinstance(state, dict) and isinstance(state.get("step"), int)):
        missing.append("train_state.step")
    if missing:
        raise CheckpointError(f"{f}: incomplete, {', '.join(missing)} missing")
    return meta


def _unreadable(f: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{f}: not a whole safetensors file, it is truncated or corrupt ({error})")


def _check_tensor_file(f: Path) -> None:
    try:
        with safe_open(str(f), "pt"):  # parses the header and checks the length it promises
            pass
    except (OSError, SafetensorError) as e:
        raise _unreadable(f, e) from None


def validate(path: Path, keys: tuple[str, ...] = ("train_state",)) -> dict:
    """Check every file of a checkpoint directory without loading the tensors; its meta."""
    meta = read_meta(path, keys)
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path / 'model.safetensors'}: missing")
    for f in sorted(path.glob("*.safetensors")):
        _check_tensor_file(f)
    return meta


def load_tensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except (OSError, SafetensorError) as e:
        raise _unreadable(f, e) from None


def read_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Everything a resume needs, checked: {file stem: tensors}, meta."""
    meta = validate(path, RESUME_KEYS)
    if not (path / "optimizer.safetensors").is_file():
        raise CheckpointError(f"{path / 'optimizer.safetensors'}: missing")
    return {f.stem: load_tensors(f) for f in sorted(path.glob("*.safetensors"))}, meta


def weights_file(path: str | Path, ema: bool | None = None) -> Path:
    """The model weights file of a checkpoint. ``ema``: None takes the EMA weights when present."""
    path = resolve(path)
    use_ema = (path / "ema.safetensors").is_file() if ema is None else ema
    f = path / ("ema.safetensors" if use_ema else "model.safetensors")
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (the run had no weight EMA; pass --weights model)" if use_ema else f"{f}: missing")
    return f


def load_weights(path: str | Path, ema: bool | None = None) -> dict[str, torch.Tensor]:
    """Model weights only (see weights_file)."""
    return load_tensors(weights_file(path, ema))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """model.load_state_dict(state), with an error naming the file, the tensor and both shapes
    when the checkpoint does not fit the model the config builds."""
    own = model.state_dict()
    hint = "the config does not describe the model that was trained (e.g. another number of classes or backbone size): use the config.yaml saved beside the checkpoint"
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise CheckpointError(f"{source}: tensor {k!r} has shape {list(state[k].shape)} in the checkpoint but {list(own[k].shape)} "
                              f"in the model built from the config{more}; {hint}")  # fmt: skip
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        lacks = f"lacks {len(missing)} tensors of the model (e.g. {missing[0]!r})" if missing else ""
        extra = f"has {len(unexpected)} tensors the model does not (e.g. {unexpected[0]!r})" if unexpected else ""
        raise CheckpointError(f"{source}: the checkpoint {' and '.join(x for x in (lacks, extra) if x)}; {hint}")
    model.load_state_dict(state)


def update_train_state(path: Path, train_state: dict) -> None:
    """Atomically replace the train_state in a committed checkpoint's meta.json (what the
    evaluation right after its save learnt: best metric, evaluation done)."""
    meta = read_meta(path)
    meta["train_state"] = train_state
    tmp = path / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    _fsync(tmp)
    os.replace(tmp, path / "meta.json")
    _fsync(path)


# ---- optimizer state: tensors to safetensors, the rest to JSON -----------------------------------
def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, other = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                other.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "state": other}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["state"].items():
        state.setdefault(int(pid), {}).update(entries)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- RNG states ------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states (picklable; gathered to rank 0 under DDP)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (keys, int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Put back what rng_state() returned (same process)."""
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys, pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def split_rng(states: list[dict]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Per-rank RNG states -> (tensors for safetensors, JSON-able rest)."""
    tensors, rest = {}, []
    for rank, s in enumerate(states):
        keys, pos, has_gauss, gauss = s["numpy"]
        tensors[f"{rank}.torch"] = s["torch"]
        tensors[f"{rank}.numpy"] = torch.from_numpy(keys.astype(np.int64))
        for i, c in enumerate(s["cuda"]):
            tensors[f"{rank}.cuda.{i}"] = c
        version, internal, gauss_next = s["python"]
        rest.append({"python": [version, list(internal), gauss_next], "numpy": [pos, has_gauss, gauss], "num_cuda": len(s["cuda"])})
    return tensors, rest


def restore_rng(tensors: dict[str, torch.Tensor], rest: list[dict], rank: int) -> bool:
    """Restore rank's RNG states; False when the checkpoint has none for this rank."""
    if rank >= len(rest):
        return False
    r = rest[rank]
    version, internal, gauss_next = r["python"]
    random.setstate((version, tuple(internal), gauss_next))
    pos, has_gauss, gauss = r["numpy"]
    np.random.set_state(("MT19937", tensors[f"{rank}.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors[f"{rank}.torch"])
    if r["num_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"{rank}.cuda.{i}"] for i in range(r["num_cuda"])])
    return True
