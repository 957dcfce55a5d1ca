"""Run logging (rank 0 only): metrics.jsonl, TensorBoard scalars, and a tqdm bar on a TTY or
plain periodic lines otherwise."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm


def error_message(error: BaseException) -> str:
    """One line for the tools' ``error:`` output: an OSError as 'path: reason' (not a bare
    '[Errno 2] ...'), anything else as its message."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _kept(line: str, start_step: int, redo_eval: bool) -> bool:
    """Whether a metrics.jsonl record survives a (re)start at ``start_step``."""
    try:
        record = json.loads(line)
        step, kind = record["step"], record["kind"]
    except (ValueError, KeyError, TypeError):  # a last line cut short by a kill
        return False
    return step < start_step or (step == start_step and not (redo_eval and kind == "eval"))


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True, redo_eval: bool = False):
        """``start_step``: the restored step (0 without a checkpoint); ``redo_eval``: the
        evaluation at that step is run again."""
        self.enabled = enabled
        self.total, self.start = total_steps, start_step
        self.t0 = time.monotonic()
        if not enabled:
            return
        self.jsonl_path = run_dir / "metrics.jsonl"
        if self.jsonl_path.exists():
            # The run redoes every step after its checkpoint (all of them when it was stopped
            # before the first one): drop their old records so no step appears twice.
            kept = [line for line in self.jsonl_path.read_text().splitlines() if _kept(line, start_step, redo_eval)]
            self.jsonl_path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = open(self.jsonl_path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) if sys.stderr.isatty() else None

    def _record(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()  # readers (and the resume test) watch this file live

    def train(self, step: int, scalars: dict[str, float], log: bool) -> None:
        """Called after every optimizer step (step counts completed steps); writes when ``log``."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
            self.bar.update(1)
        if not log:
            return
        self._record({"step": step, "kind": "train", **scalars})
        for k, v in scalars.items():
            self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is None:
            rate = (step - self.start) / max(time.monotonic() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else math.inf
            fields = "  ".join(f"{k} {_fmt(v)}" for k, v in scalars.items())
            print(f"step {step}/{self.total}  {fields}  | {rate:.2f} step/s, eta {_duration(eta) if math.isfinite(eta) else '?'}", flush=True)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._record({"step": step, "kind": "eval", **metrics})
        for k, v in metrics.items():
            self.tb.add_scalar(f"eval/{k}", v, step)
        self.info(f"eval @ step {step}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        self.jsonl.close()
