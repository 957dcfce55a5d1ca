"""Checkpoints: a directory of safetensors files (all tensors) and meta.json (everything else).

    checkpoints/
      step_000100/   model.safetensors  [ema.safetensors]  optimizer.safetensors  rng.safetensors
                     meta.json  config.yaml
      last -> step_000100      best -> step_000080      (symlinks)

A checkpoint is written into a hidden ``.step_N.tmp`` directory, every file is fsynced, and
the directory is renamed into place: the rename is the commit point, so a reader never sees a
half-written checkpoint. ``last``/``best`` are symlinks swapped with os.replace (also atomic).
Nothing is unpickled on load: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d+)$")


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


def latest(root: Path) -> Path | None:
    """The checkpoint ``last`` points to; if the pointer is missing or dangling (killed between
    the commit and the pointer update), the newest committed step directory."""
    link = root / "last"
    if link.is_symlink() and (link / "meta.json").is_file():
        return link.resolve()
    steps = sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_DIR.match(p.name)) and (p / "meta.json").is_file())
    return steps[-1][1] if steps else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from itself, a checkpoints/ folder, or a run directory."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "meta.json").is_file():
            return candidate.resolve()
        if candidate.is_dir() and (found := latest(candidate)) is not None:
            return found
    raise FileNotFoundError(f"no checkpoint at {path} (expected a step_N directory, a checkpoints/ folder or a run directory)")


def read_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    tensors = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    return tensors, json.loads((path / "meta.json").read_text())


def load_weights(path: str | Path, ema: bool | None = None) -> dict[str, torch.Tensor]:
    """Model weights only. ``ema``: None takes the EMA weights when the checkpoint has them."""
    path = resolve(path)
    use_ema = (path / "ema.safetensors").is_file() if ema is None else ema
    return load_file(str(path / ("ema.safetensors" if use_ema else "model.safetensors")))


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
