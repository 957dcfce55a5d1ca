"""The task-agnostic training loop.

One optimizer step = ``train.grad_accum`` micro-batches; each micro-batch is a GLOBAL group
of about ``data.tokens_per_batch`` tokens split across ranks by tokens (see sampler.py).
Losses are normalized by counts summed over all ranks and micro-batches of the step
(``Task.count`` -> ``LossContext.totals``) and multiplied by the world size before backward
because DDP averages gradients: so accumulation and any number of ranks compute the gradient
of the same global-batch loss as one process would.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from ..data import PACKING_ALGORITHMS, PackedBatch
from ..utils.cpu_malloc import keep_freed_buffers
from . import checkpoint as ckpt
from .config import ConfigError, diff_configs, to_object, to_yaml
from .data import MicroBatch, build_loader, steps
from .distributed import (DistEnv, all_reduce_sum, average_gradients, barrier, broadcast_object, collective_errors, gather_objects,
                          init_distributed)  # fmt: skip
from .logger import RunLogger
from .optim import build_ema, build_optimizer, build_scheduler, find_backbone
from .task import LossContext, Task, get_task


class NonFiniteLossError(FloatingPointError):
    pass


class NoUsableDataError(RuntimeError):
    """Every training sample of a whole epoch was skipped as bad input."""


@dataclass
class TrainState:
    """Progress saved in every checkpoint (meta.json)."""

    step: int = 0  # completed optimizer steps
    epoch: int = 0  # data position of the NEXT step: (epoch, step within the epoch)
    step_in_epoch: int = 0
    skipped_nonfinite: int = 0  # steps skipped for a NaN/inf loss or gradient
    consecutive_nonfinite: int = 0
    overflow_steps: int = 0  # fp16 steps the GradScaler skipped
    skipped_samples: int = 0  # training samples dropped for bad input (all ranks)
    best_value: float | None = None
    best_step: int | None = None
    # The checkpoint of this step is written before the evaluation due at the same step (so a
    # failing evaluation loses nothing); True until that evaluation is done, so a resume runs it.
    pending_eval: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(obj: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return obj
    if torch.is_tensor(obj) or isinstance(obj, PackedBatch):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def tune_cpu_malloc(train, device: torch.device) -> dict | None:
    """utils/cpu_malloc.keep_freed_buffers for a CPU run that asks for it (train.cpu_malloc_tuning);
    returns what it did, or None when not asked."""
    return keep_freed_buffers() if device.type == "cpu" and train.cpu_malloc_tuning else None


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def check_config(c, env: DistEnv) -> None:
    """Errors a run would otherwise hit late (or silently), as ConfigErrors naming the key."""
    t, d, o = c.train, c.data, c.optim
    if t.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {t.precision!r}")
    if t.precision == "fp16" and env.device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA (GradScaler); use bf16 on CPU")
    if t.best_mode not in ("max", "min"):
        raise ConfigError(f"train.best_mode must be max or min, got {t.best_mode!r}")
    for key in ("steps", "grad_accum", "ckpt_every", "log_every", "keep_last", "max_consecutive_nonfinite"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if not (math.isfinite(t.collective_timeout_s) and t.collective_timeout_s > 0):
        raise ConfigError(f"train.collective_timeout_s must be a positive number of seconds, got {t.collective_timeout_s}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 disables the EMA), got {t.ema_decay}")
    for key, positive in (("lr", False), ("weight_decay", False), ("clip_grad", False), ("min_lr_ratio", False), ("eps", True), ("layer_decay", True)):
        value = getattr(o, key)
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise ConfigError(f"optim.{key} must be a finite number {'>' if positive else '>='} 0, got {value}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if d.packing not in PACKING_ALGORITHMS:
        raise ConfigError(f"data.packing must be one of {PACKING_ALGORITHMS}, got {d.packing!r}")
    if d.max_images_per_seq < 0:
        raise ConfigError(f"data.max_images_per_seq must be >= 0 (0: no limit, 1: no packing), got {d.max_images_per_seq}")
    for key in ("max_tokens_per_image", "seq_len", "tokens_per_batch"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {getattr(d, key)}")


def check_capacity(d, num_prefix_tokens: int) -> None:
    if d.max_tokens_per_image + num_prefix_tokens > d.seq_len:
        raise ConfigError(f"data.max_tokens_per_image ({d.max_tokens_per_image}) + {num_prefix_tokens} prefix tokens exceeds data.seq_len ({d.seq_len})")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def _rng_unchanged():
    """Evaluation leaves the training RNGs as they were, so a run resumed from the checkpoint
    written just before an evaluation goes on exactly like the run that evaluated."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


_DDP_ARGS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters)


@torch.no_grad()
def evaluate(task: Task, cfg, model: torch.nn.Module, loader, env: DistEnv, evaluator=None) -> dict[str, float]:
    """Run the task's evaluator (a new one unless given) over a loader (each rank its shard);
    metrics on every rank."""
    was_training = model.training
    model.eval()
    evaluator = evaluator if evaluator is not None else task.build_evaluator()
    loader.batch_sampler.set_epoch(0)
    for m in loader:
        with autocast(cfg.train.precision, env.device):
            outputs = model(to_device(m.batch, env.device))
        evaluator.process(outputs, to_device(m.targets, env.device))
    model.train(was_training)
    if env.distributed:
        states = gather_objects(evaluator.state())
        if env.is_main:
            evaluator.merge(states[1:])
    metrics = evaluator.metrics() if env.is_main else None
    return {k: float(v) for k, v in broadcast_object(metrics).items()}


def _read_summary(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


class Trainer:
    def __init__(self, cfg: DictConfig, resume: bool = False):
        self.cfg_node = cfg
        self.cfg = c = to_object(cfg)
        self.env = env = init_distributed(c.train.device, c.train.collective_timeout_s)
        check_config(c, env)
        malloc = tune_cpu_malloc(c.train, env.device)
        self.run_dir = Path(c.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.restored_from = restore_from = self._prepare_run_dir(resume)

        seed_everything(c.seed + env.rank)  # DDP copies rank 0's initial weights to every rank
        self.task = get_task(c.task)(c)
        self.task.load_pretrained = restore_from is None  # a resumed run restores its own weights
        self.model = self.task.build_model().to(env.device)
        _, backbone = find_backbone(self.model)
        if backbone is None:
            raise TypeError(f"task {c.task!r}: build_model must return a module containing a NaViT backbone")
        check_capacity(c.data, backbone.num_prefix_tokens)
        pack = dict(patch_size=backbone.patch_size, num_prefix_tokens=backbone.num_prefix_tokens, world_size=env.world_size, rank=env.rank)
        self.train_set, self.val_set = self.task.build_dataset("train"), self.task.build_dataset("val")
        self.train_loader = build_loader(self.task, self.train_set, c, train=True, **pack)
        self.val_loader = build_loader(self.task, self.val_set, c, train=False, **pack) if self.val_set is not None else None
        # Built now, so a validation ground truth its evaluator refuses stops the run before any
        # training rather than after it; the first evaluation uses it.
        self._evaluator = self.task.build_evaluator() if self.val_set is not None else None

        self.optimizer = build_optimizer(self.model, c.optim)
        self.scheduler = build_scheduler(self.optimizer, c.optim, c.train.steps)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=c.train.precision == "fp16")
        self.ddp = None
        if env.distributed:  # wrapping copies rank 0's weights to every rank: the EMA copy comes after
            ids = [env.device.index] if env.device.type == "cuda" else None
            # No buffer broadcast in forward (the models' buffers are constants): a forward must
            # hold no collective, since in a step with an empty micro-batch ranks run different
            # numbers of forwards (see _step).
            # (torch >= 2.14 names it forward_sync_buffers and warns about broadcast_buffers.)
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS else {"broadcast_buffers": False}
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=c.train.find_unused_parameters, **no_sync)
        self.train_model = self.ddp or self.model
        self.ema = build_ema(self.model, c.train.ema_decay) if c.train.ema_decay > 0 else None
        self.state = TrainState()
        self.skip_reasons: Counter[str] = Counter()  # this process, this run segment (summary)
        self._names: dict[str, list[str]] = {}  # count / loss names, the same on every rank (see _agreed)
        if restore_from is not None:
            self._restore(restore_from)
        st = self.state
        finished = st.step >= c.train.steps
        # A finished run keeps its summary; a run stopped after a checkpoint but before the
        # evaluation due at it (or before its summary) does that evaluation first.
        self.finished_summary = None
        if finished and (summary := _read_summary(self.run_dir / "summary.json")) is not None and summary.get("steps") == st.step:
            self.finished_summary = summary
        self.owed_eval = self.val_loader is not None and self.finished_summary is None and (st.pending_eval or finished)
        self.logger = RunLogger(self.run_dir, c.train.steps, st.step, enabled=env.is_main, redo_eval=self.owed_eval)
        if self.task.pretrained_report is not None:
            r = self.task.pretrained_report
            self.logger.info(f"backbone initialised from {r['path']} ({r['format']}, prefix {r['prefix']!r}): {r['loaded']} tensors; "
                             f"skipped from the file: {r['skipped_source_keys'] or 'none'}; kept as initialised: {r['kept_initialised'] or 'none'}; "
                             f"zero-initialised (added to the trunk): {r.get('zero_initialised') or 'none'}")  # fmt: skip
        if malloc is not None:
            self.logger.info(f"CPU malloc tuning (train.cpu_malloc_tuning): {malloc}")
        if restore_from is not None:
            self.logger.info(f"resumed from {restore_from} at step {st.step} (epoch {st.epoch}, step {st.step_in_epoch} in epoch)")

    # ---- run directory and checkpoints ------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> Path | None:
        existing = ckpt.step_dirs(self.ckpt_dir)
        if existing and not resume:
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, or choose another --output-dir")
        found = ckpt.latest(self.ckpt_dir) if existing else None  # the newest valid one; corrupt newer ones are warned about
        if existing and found is None:
            raise ckpt.CheckpointError(f"none of the {len(existing)} checkpoints in {self.ckpt_dir} is usable (see the warnings above); "
                                       f"move them away to start the run over")  # fmt: skip
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.ckpt_dir)
            saved = self.run_dir / "config.yaml"
            if found is not None and saved.is_file():
                changed = diff_configs(OmegaConf.create(yaml.safe_load(saved.read_text())), self.cfg_node)
                if changed:
                    print(f"warning: resuming with a changed config: {', '.join(changed)}", flush=True)
            _write_atomic(saved, to_yaml(self.cfg_node))
        barrier()
        if resume and found is None and self.env.is_main:
            print(f"--resume: no checkpoint in {self.ckpt_dir}, starting from scratch", flush=True)
        return found

    def _restore(self, path: Path) -> None:
        tensors, meta = ckpt.read_checkpoint(path)
        ckpt.load_model_state(self.model, tensors["model"], path / "model.safetensors")
        if self.ema is not None:
            name = "ema" if "ema" in tensors else "model"
            ckpt.load_model_state(self.ema.module, tensors[name], path / f"{name}.safetensors")
        self.optimizer.load_state_dict(ckpt.unflatten_optimizer(tensors.get("optimizer", {}), meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.scaler.is_enabled() and meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.state = TrainState(**meta["train_state"])
        if not ckpt.restore_rng(tensors.get("rng", {}), meta["rng"], self.env.rank):
            print(f"warning: rank {self.env.rank}: no RNG state in {path} (saved with fewer ranks)", flush=True)

    def save(self, best: bool = False) -> Path:
        """Checkpoint the current step (rank 0 writes); its directory."""
        rng = gather_objects(ckpt.rng_state())  # every rank's RNG, written by rank 0
        if self.env.is_main:
            opt_tensors, opt_meta = ckpt.flatten_optimizer(self.optimizer.state_dict())
            rng_tensors, rng_rest = ckpt.split_rng(rng)
            tensors = {"model": self.model.state_dict(), "optimizer": opt_tensors, "rng": rng_tensors}
            if self.ema is not None:
                tensors["ema"] = self.ema.module.state_dict()
            meta = {
                "task": self.cfg.task,
                "world_size": self.env.world_size,
                "train_state": asdict(self.state),
                "optimizer": opt_meta,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_rest,
            }
            path = ckpt.write_checkpoint(self.ckpt_dir, self.state.step, tensors, meta, {"config.yaml": to_yaml(self.cfg_node)})
            ckpt.point(self.ckpt_dir, "last", path)
            if best:
                ckpt.point(self.ckpt_dir, "best", path)
            ckpt.prune(self.ckpt_dir, self.cfg.train.keep_last)
        barrier()
        return self.ckpt_dir / ckpt.step_name(self.state.step)

    def _record_eval(self, path: Path, best: bool) -> None:
        """Store what the evaluation right after a checkpoint's save learnt (done, best) in it."""
        if self.env.is_main:
            ckpt.update_train_state(path, asdict(self.state))
            if best:
                ckpt.point(self.ckpt_dir, "best", path)
                ckpt.prune(self.ckpt_dir, self.cfg.train.keep_last)  # the previous best is no longer pinned
        barrier()

    # ---- training ---------------------------------------------------------------------------
    def _agreed(self, kind: str, local) -> list[str]:
        """The names of the counts / losses, sorted and the same on every rank. A rank whose
        micro-batches were all skipped has none of its own, so the first step takes the union
        over the ranks (every rank caches the same result, so all call the gather together)."""
        if kind not in self._names:
            names = sorted(set().union(*gather_objects(sorted(local))))
            if not names:
                return names
            self._names[kind] = names
        return self._names[kind]

    def train_step(self, micros: list[MicroBatch]) -> dict[str, float] | None:
        """One optimizer step over this rank's micro-batches; None (on every rank) when no rank
        had a single usable sample in them."""
        c, env, st = self.cfg, self.env, self.state
        live = [m for m in micros if m.batch is not None]
        counts = [self.task.count(m.batch, m.targets) for m in live]
        names = self._agreed("count", counts[0] if counts else ())
        local = [sum(cnt[k] for cnt in counts) for k in names]
        local += [sum(m.batch.layout.num_tokens for m in live), sum(sum(m.skipped.values()) for m in micros), len(micros) - len(live)]
        for m in micros:
            self.skip_reasons.update(m.skipped)
        glob = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=env.device)).tolist()
        ctx = LossContext(step=st.step, totals=dict(zip(names, glob[: len(names)])))
        tokens, skipped, empty = glob[-3], int(glob[-2]), int(glob[-1])
        st.skipped_samples += skipped
        if tokens == 0:
            return None

        # DDP all-reduces the gradients in the backward of the last micro-batch. When some rank
        # has an empty micro-batch, ranks run different numbers of backward passes: then every
        # rank accumulates locally and the gradients are averaged once, explicitly (the same
        # average), so no rank waits for a backward another rank never runs.
        explicit = self.ddp is not None and empty > 0
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for j, m in enumerate(live):
            batch, targets = to_device(m.batch, env.device), to_device(m.targets, env.device)
            sync = self.ddp is None or (not explicit and j == len(live) - 1)
            with nullcontext() if sync else self.ddp.no_sync():
                with autocast(c.train.precision, env.device):
                    losses = self.task.losses(self.train_model(batch), targets, ctx)
                self.scaler.scale(losses["loss"] * env.world_size).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        if explicit:
            average_gradients(self.model.parameters(), env.world_size)
        keys = self._agreed("loss", sums)
        zero = torch.zeros((), device=env.device)
        scalars = dict(zip(keys, all_reduce_sum(torch.stack([sums.get(k, zero) for k in keys])).tolist()))

        lr = max(self.scheduler.get_last_lr())
        grad_norm = math.nan
        finite = math.isfinite(scalars["loss"])  # the global loss: every rank takes the same decision
        if finite:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.clip_grad or math.inf))
            if math.isfinite(grad_norm) or self.scaler.is_enabled():
                scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
                self.scaler.step(self.optimizer)  # with fp16 an overflow makes the scaler skip the update
                self.scaler.update()
                if scale is not None and self.scaler.get_scale() < scale:
                    st.overflow_steps += 1
                elif self.ema is not None:
                    self.ema.update(self.model)
            else:
                finite = False
        if finite:
            st.consecutive_nonfinite = 0
        else:
            st.skipped_nonfinite += 1
            st.consecutive_nonfinite += 1
            self.optimizer.zero_grad(set_to_none=True)
            if st.consecutive_nonfinite >= c.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{st.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
                    f"(last: step {st.step + 1}, loss {scalars['loss']}, grad norm {grad_norm}); stopping "
                    f"(train.max_consecutive_nonfinite={c.train.max_consecutive_nonfinite}). "
                    f"Lower optim.lr, set optim.clip_grad, or check the data."
                )
        self.scheduler.step()
        return {**scalars, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, **ctx.totals, "skipped_nonfinite": st.skipped_nonfinite}

    def evaluate(self) -> dict[str, float]:
        model = self.ema.module if self.ema is not None else self.model  # never the DDP wrapper
        evaluator, self._evaluator = self._evaluator, None
        with _rng_unchanged():
            return evaluate(self.task, self.cfg, model, self.val_loader, self.env, evaluator)

    def _track_best(self, metrics: dict[str, float]) -> bool:
        name, st = self.cfg.train.best_metric, self.state
        if not name:
            return False
        if name not in metrics:
            raise KeyError(f"train.best_metric={name!r} is not among the evaluator's metrics: {', '.join(sorted(metrics))}")
        value = metrics[name]
        sign = 1 if self.cfg.train.best_mode == "max" else -1
        if st.best_value is None or sign * (value - st.best_value) > 0:
            st.best_value, st.best_step = value, st.step
            return True
        return False

    def _evaluate_step(self, saved: Path | None) -> dict[str, float]:
        """The evaluation of the current step; ``saved``: the step's checkpoint, written just before."""
        metrics = self.evaluate()
        self.logger.eval(self.state.step, metrics)
        best = self._track_best(metrics)
        self.state.pending_eval = False
        if saved is not None:
            self._record_eval(saved, best)
        elif best:
            self.save(best=True)
        return metrics

    def fit(self) -> dict:
        c, st = self.cfg, self.state
        t = c.train
        if self.finished_summary is not None:
            self.logger.info(f"{self.run_dir} already finished at step {st.step} (train.steps={t.steps}); its summary.json is kept")
            self.logger.close()
            return self.finished_summary
        stream = steps(self.train_loader, st.epoch, st.step_in_epoch)
        sampler = self.train_loader.batch_sampler
        t0 = time.monotonic()
        metrics: dict[str, float] = {}
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        try:
            if self.owed_eval:  # the evaluation a stopped run owes to its last checkpoint
                metrics = self._evaluate_step(self.restored_from)
            unusable = 0  # steps in a row without a single usable sample
            while st.step < t.steps:
                t_step = time.monotonic()
                micros = next(stream)
                scalars = self.train_step(micros)
                last = micros[-1]
                if last.step + 1 < sampler.steps_in_epoch(last.epoch):
                    st.epoch, st.step_in_epoch = last.epoch, last.step + 1
                else:
                    st.epoch, st.step_in_epoch = last.epoch + 1, 0
                if scalars is None:  # every sample of these micro-batches was skipped: the next ones make the step
                    unusable += 1
                    if unusable >= sampler.steps_in_epoch(last.epoch):
                        raise NoUsableDataError(f"no usable training sample in {unusable} steps in a row (a whole epoch): every one was skipped "
                                                f"as bad input ({dict(self.skip_reasons)}); see the warnings above")  # fmt: skip
                    continue
                unusable = 0
                st.step += 1
                scalars["step_time"] = time.monotonic() - t_step
                final = st.step == t.steps
                self.logger.train(st.step, scalars, log=st.step % t.log_every == 0 or final)

                eval_due = self.val_loader is not None and ((t.eval_every and st.step % t.eval_every == 0) or final)
                saved = None
                if st.step % t.ckpt_every == 0 or final:  # before the evaluation: a failing one loses nothing
                    st.pending_eval = eval_due
                    saved = self.save()
                if eval_due:
                    metrics = self._evaluate_step(saved)
        finally:
            self.logger.close()
            torch.use_deterministic_algorithms(deterministic_before)
        return self._summary(metrics, time.monotonic() - t0)

    def _summary(self, metrics: dict[str, float], seconds: float) -> dict:
        st = self.state
        summary = {
            "run_dir": str(self.run_dir),
            "steps": st.step,
            "skipped_nonfinite_steps": st.skipped_nonfinite,
            "fp16_overflow_steps": st.overflow_steps,
            "skipped_samples": st.skipped_samples,
            "skipped_by_reason": dict(sum((Counter(r) for r in gather_objects(dict(self.skip_reasons))), Counter())),
            "data_skips": self.train_set.skip_summary() if hasattr(self.train_set, "skip_summary") else None,
            "val_data_skips": self.val_set.skip_summary() if self.val_set is not None and hasattr(self.val_set, "skip_summary") else None,
            "best_metric": self.cfg.train.best_metric or None,
            "best_value": st.best_value,
            "best_step": st.best_step,
            "final_metrics": metrics,
            "seconds": round(seconds, 2),
        }
        if self.env.is_main:
            _write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
            print("run summary: " + json.dumps(summary), flush=True)
        return summary


def train(cfg: DictConfig, resume: bool = False) -> dict:
    """Train (or resume) the run in cfg.output_dir; returns the run summary. Under DDP a
    collective that times out (a stopped rank) raises CollectiveTimeoutError."""
    with collective_errors(cfg.train.collective_timeout_s):
        return Trainer(cfg, resume).fit()


def load_for_evaluation(c, path: Path | None, ema: bool | None, device: torch.device, split: str = "val") -> tuple[Task, nn.Module, nn.Module, Any]:
    """(task, eval-mode model with the checkpoint's weights, its NaViT backbone, the split's
    dataset) for a resolved checkpoint directory; model.backbone.init is not read (the
    checkpoint replaces it). ``path`` None evaluates the weights the config names (e.g. an
    imported detector, zero-shot)."""
    task = get_task(c.task)(c)
    task.load_pretrained = path is None
    model = task.build_model().to(device)
    if path is not None:
        weights = ckpt.weights_file(path, ema)
        ckpt.load_model_state(model, ckpt.load_tensors(weights), weights)
    model.eval()
    _, backbone = find_backbone(model)
    dataset = task.build_dataset(split)
    if dataset is None:
        raise ValueError(f"task {c.task!r} has no {split!r} split with this config")
    return task, model, backbone, dataset


def evaluate_checkpoint(cfg: DictConfig, checkpoint: str | Path, ema: bool | None = None, split: str = "val") -> tuple[dict[str, float], Path]:
    """(metrics, checkpoint directory) of a checkpoint's weights (EMA ones when present,
    unless ``ema`` says otherwise) on a dataset split; works under torchrun too. Every file of
    the checkpoint is checked before anything is evaluated."""
    c = to_object(cfg)
    path = ckpt.resolve(checkpoint)
    env = init_distributed(c.train.device, c.train.collective_timeout_s)
    tune_cpu_malloc(c.train, env.device)
    task, model, backbone, dataset = load_for_evaluation(c, path, ema, env.device, split)
    loader = build_loader(task, dataset, c, patch_size=backbone.patch_size, num_prefix_tokens=backbone.num_prefix_tokens, train=False, world_size=env.world_size, rank=env.rank)
    with collective_errors(c.train.collective_timeout_s):
        return evaluate(task, c, model, loader, env), path
