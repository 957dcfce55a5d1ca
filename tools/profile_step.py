#!/usr/bin/env python
"""Where one training step's time goes, and how often it makes the host wait for the device.

    python tools/profile_step.py --config configs/detection/owl_navit_tiny_synthetic_lvis.yaml \
        [--batches 16,32] [--repeats 3] [--json OUT] [key=value ...]

For each batch size B (images per step) the tool builds the run exactly as tools/train.py does
(task, model, optimizer, EMA, data loader; output_dir under a temporary folder) and one
micro-batch of B images, the first B of the training split through the engine's own dataset
wrapper and collate. Then:

- ``stages_s``: median seconds over ``--repeats`` steps of each stage, run in the step's order
  with the device synchronized between them: ``data`` (decode + augment + collate of B images),
  ``backbone`` (the NaViT forward), ``head`` (the rest of the model's forward), ``loss``,
  ``backward`` and ``optimizer`` (clip + step + EMA);
- ``step_s``: median seconds of the engine's real ``Trainer.train_step`` on that micro-batch;
- ``host_syncs``: the host round trips of one real ``train_step`` (``.item()``, ``.tolist()``,
  ``.cpu()``, ``bool()`` of a tensor, ``nonzero`` / boolean-mask indexing, ...), counted by
  navit_dense.utils.host_sync; they must not grow with B (reads of torch.optim's per-parameter
  step counters, which stay on the host in GPU runs too, are not round trips and not counted);
- ``batch_mb``: the packed batch's tensors (what is pinned and copied to the device; 4x
  smaller patches with ``uint8_patches``, on by default on CUDA, see ``data.uint8_patches``);
- ``peak_mem_mb``: the step's peak (CUDA: max_memory_allocated; CPU: tensor bytes from the
  profiler, see navit_dense.utils.benchmark.peak_memory).

Use a task config and its data keys (e.g. ``data.train_json=...`` for detection, or the
synthetic data the configs name). Writes JSON with one row per batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import navit_dense.tasks  # noqa: F401  (registers the built-in tasks)
from navit_dense.engine.config import load_config
from navit_dense.engine.optim import find_backbone
from navit_dense.engine.sampler import SampleKey
from navit_dense.engine.trainer import Trainer, autocast, to_device
from navit_dense.utils.benchmark import peak_memory, synchronize
from navit_dense.utils.host_sync import HostSyncCounter

STAGES = ("data", "backbone", "head", "loss", "backward", "optimizer")


class StageTimer:
    """Seconds per named stage, the device synchronized at both ends of each."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        t0 = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def micro_batch(trainer: Trainer, images: int):
    """The first ``images`` training samples through the engine's dataset wrapper and collate."""
    loader = trainer.train_loader
    budget = trainer.cfg.data.max_tokens_per_image
    keys = [SampleKey(index=i, budget=budget, seed=i, epoch=0, step=0) for i in range(min(images, len(loader.dataset)))]
    return loader.collate_fn([loader.dataset[k] for k in keys])


def staged_step(trainer: Trainer, timer: StageTimer, images: int):
    """One step, stage by stage, as Trainer.train_step runs it (single process)."""
    with timer("data"):
        m = micro_batch(trainer, images)
    env, c = trainer.env, trainer.cfg
    batch, targets = to_device(m.batch, env.device), to_device(m.targets, env.device)
    _, backbone = find_backbone(trainer.model)
    spent = []

    def timed(method):  # heads call forward() or forward_features(): time whichever runs
        def run(*args, **kwargs):
            t = _now(env.device)
            out = method(*args, **kwargs)
            spent.append(_now(env.device) - t)
            return out

        return run

    backbone.forward, backbone.forward_features = timed(backbone.forward), timed(backbone.forward_features)
    try:
        trainer.optimizer.zero_grad(set_to_none=True)
        t0 = _now(env.device)
        with autocast(c.train.precision, env.device):
            outputs = trainer.model(batch)
        total = _now(env.device) - t0
    finally:
        del backbone.forward, backbone.forward_features  # back to the class's methods
    inner = spent[-1] if spent else 0.0  # forward() calls forward_features(): the outermost call is the last to finish
    timer.seconds["backbone"] = timer.seconds.get("backbone", 0.0) + inner
    timer.seconds["head"] = timer.seconds.get("head", 0.0) + total - inner
    counts = trainer.task.count(m.batch, m.targets)
    from navit_dense.engine.task import LossContext

    with timer("loss"), autocast(c.train.precision, env.device):
        loss = trainer.task.losses(outputs, targets, LossContext(step=0, totals=counts))["loss"]
    with timer("backward"):
        trainer.scaler.scale(loss).backward()
    with timer("optimizer"):
        trainer.scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), c.optim.clip_grad or float("inf"))
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        if trainer.ema is not None:
            trainer.ema.update(trainer.model)
    return m


def _now(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def profile(config: str, overrides: list[str], batches: list[int], repeats: int) -> dict:
    rows = []
    for images in batches:
        with tempfile.TemporaryDirectory() as tmp:
            # tokens_per_batch only sizes the loader's own plan; the profiled micro-batch holds exactly `images`.
            cfg = load_config(config, [*overrides, f"output_dir={tmp}/run", "train.steps=1000000", "data.num_workers=0"])
            trainer = Trainer(cfg)
            trainer.model.train()
            device = trainer.env.device
            timer = StageTimer(device)
            per_step = []
            for _ in range(repeats + 1):  # the first step warms up (allocator, kernels, lazy layouts)
                before = dict(timer.seconds)
                m = staged_step(trainer, timer, images)
                per_step.append({k: timer.seconds[k] - before.get(k, 0.0) for k in STAGES})
            stages = {k: statistics.median(s[k] for s in per_step[1:]) for k in STAGES}
            step_times = []
            syncs = None
            for r in range(repeats + 1):
                t0 = _now(device)
                if r == repeats:  # the last real step is the counted one
                    # torch.optim keeps its per-parameter step counters on the host (not fused /
                    # capturable): reading them is no device round trip, even on a GPU.
                    host_state = [st["step"] for st in trainer.optimizer.state.values() if torch.is_tensor(st.get("step"))]
                    with HostSyncCounter(ignore=host_state) as syncs:
                        trainer.train_step([m])
                else:
                    trainer.train_step([m])
                step_times.append(_now(device) - t0)
            peak, method = peak_memory(lambda: trainer.train_step([m]), device)
            rows.append({
                "batch_images": m.batch.num_images,
                "tokens": m.batch.layout.num_tokens,
                "uint8_patches": m.batch.pixel_norm is not None,  # data.uint8_patches (auto: on with CUDA)
                "batch_mb": round(sum(m.batch.tensor_bytes().values()) / 2**20, 3),  # what the host-to-device copy moves
                "stages_s": {k: round(v, 5) for k, v in stages.items()},
                "step_s": round(statistics.median(step_times[1:]), 5),
                "host_syncs": syncs.total,
                "host_syncs_by_kind": dict(syncs.calls),
                "peak_mem_mb": round(peak / 2**20, 1),
                "peak_mem_method": method,
            })  # fmt: skip
            trainer.logger.close()
    return {"config": str(config), "overrides": overrides, "device": str(device), "threads": torch.get_num_threads(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", required=True, help="a task config (as given to tools/train.py)")
    ap.add_argument("--batches", default="16,32", help="comma-separated images per step")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per batch size (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.repeats < 1:
        ap.error("--batches needs positive sizes and --repeats >= 1")
    try:
        report = profile(args.config, args.overrides, batches, args.repeats)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    head = f"{'images':>6} {'tokens':>7} " + " ".join(f"{s:>9}" for s in STAGES) + f" {'step':>8} {'syncs':>6} {'peak MB':>8}"
    print(head + "\n" + "-" * len(head))
    for r in report["rows"]:
        print(f"{r['batch_images']:>6} {r['tokens']:>7} " + " ".join(f"{r['stages_s'][s]:>9.4f}" for s in STAGES)
              + f" {r['step_s']:>8.4f} {r['host_syncs']:>6} {r['peak_mem_mb']:>8.1f}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
