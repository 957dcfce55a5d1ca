"""Evaluate one detection checkpoint at several input resolutions (NaViT's resolution knob).

At max resolution R (pixels) every image is packed with a token budget of (R / P)^2 patches
and its longer side capped at R, aspect ratio kept; the same weights are evaluated with the
ground truth's protocol at each R (the detection task's evaluator). Per resolution the sweep
records AP, AP50, APr, APc, APf (COCO-format ground truth: AP, AP50, AP75, APs, APm, APl: the
columns follow the format, ``sweep_columns``), the mean tokens per image, throughput and peak
memory, and writes ``resolution_sweep.{json,csv,png}``.

Usage (the CLI mode is ``tools/eval_lvis.py --config FILE --checkpoint CKPT --max-res ...``)::

    # tools/eval_sweep_example
    python tools/eval_lvis.py --config configs/detection/owl_navit_tiny_synthetic_lvis.yaml \\
        --checkpoint runs/demo/owl_tiny/checkpoints/last --max-res 256,384,512,768

    # from Python
    from navit_dense.engine.config import load_config
    import navit_dense.tasks  # registers the built-in tasks
    from navit_dense.engine.resolution_sweep import run_resolution_sweep
    cfg = load_config("configs/detection/owl_navit_tiny_synthetic_lvis.yaml")
    rows = run_resolution_sweep(cfg, "runs/demo/owl_tiny/checkpoints/last", [128, 192, 256], "runs/demo/sweep")

Throughput: ``images_per_s`` counts model forward time only (synchronized on CUDA), the part
the resolution changes; ``eval_seconds`` is the whole pass (decoding, packing, forward,
post-processing). Memory: on CUDA ``peak_mem_mb`` is ``torch.cuda.max_memory_allocated``
during the pass. On CPU torch has no allocator statistics, so it is the process's peak
resident set size during the pass: Linux's VmHWM, reset before each resolution by writing
"5" to /proc/self/clear_refs (``mem_method`` "vmhwm"); it includes the model, Python and the
dataset, and ``peak_mem_delta_mb`` subtracts the resident size at the start of the pass.
Without /proc (``mem_method`` "ru_maxrss") the value is getrusage's lifetime peak, which
never decreases: resolutions run in increasing order so each row still bounds its own need.
Single process; run it outside torchrun.
"""

from __future__ import annotations

import csv
import json
import re
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

from . import checkpoint as ckpt
from .config import Config, load_config, to_object
from .data import build_loader
from .distributed import init_distributed
from .trainer import autocast, load_for_evaluation, to_device

SWEEP_METRICS = {"lvis": ("AP", "AP50", "APr", "APc", "APf"), "coco": ("AP", "AP50", "AP75", "APs", "APm", "APl")}
LAYOUTS = ("native", "square")  # packed at native aspect, or padded to a square first (data.square_pad)


def sweep_columns(fmt: str = "lvis") -> tuple[str, ...]:
    """CSV columns of a sweep over ground truth of format ``fmt`` ("lvis" or "coco")."""
    return ("layout", "max_res", "max_tokens_per_image", "mean_tokens_per_image", *SWEEP_METRICS[fmt], "images", "images_per_s",
            "eval_seconds", "peak_mem_mb", "peak_mem_delta_mb", "mem_method")  # fmt: skip


COLUMNS = sweep_columns("lvis")
_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory (MiB) of the code run between start() and stop(), see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda" if device.type == "cuda" else ("vmhwm" if self._can_reset() else "ru_maxrss")

    @staticmethod
    def _can_reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            _status_kb("VmHWM")
            return True
        except (OSError, AttributeError):
            return False

    def _now_mb(self) -> float:
        if self.method == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        if self.method == "vmhwm":
            return _status_kb("VmRSS") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)

    def start(self) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "vmhwm":
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        self.base = self._now_mb()

    def stop(self) -> tuple[float, float]:
        """(peak, peak minus the value at start)."""
        if self.method == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method == "vmhwm":
            peak = _status_kb("VmHWM") / 1024
        else:
            peak = self._now_mb()
        return peak, peak - self.base


def resolution_config(c: Config, max_res: int, patch_size: int, num_prefix_tokens: int, **data_overrides) -> Config:
    """The config evaluating at max resolution ``max_res``: budget (max_res / P)^2, longer side
    <= max_res, sequences (and eval micro-batches) large enough for one such image; plus any
    task-specific data fields (e.g. the segmentation eval mode)."""
    if max_res < patch_size:
        raise ValueError(f"max resolution {max_res} is smaller than one {patch_size}-pixel patch")
    budget = (max_res // patch_size) ** 2
    need = budget + num_prefix_tokens
    d = c.data
    data = replace(d, max_tokens_per_image=budget, max_side=max_res, seq_len=max(d.seq_len, need),
                   eval_tokens_per_batch=max(d.eval_tokens_per_batch or d.tokens_per_batch, need), **data_overrides)  # fmt: skip
    return replace(c, data=data)


@torch.no_grad()
def evaluate_at(task, model, backbone, dataset, c_res: Config, env, memory: PeakMemory, evaluator, *, warmup: bool = False,
                images_of=lambda batch, targets: batch.num_images) -> dict:  # fmt: skip
    """One evaluation pass packed by ``c_res`` (see the module docstring for the method): the
    columns both sweeps share, and the evaluator's metrics under "metrics". ``images_of``
    counts the images of a micro-batch (segmentation: windows are not images)."""
    task.cfg = c_res  # the task keeps its loaded files; only packing / evaluation settings change
    loader = build_loader(task, dataset, c_res, patch_size=backbone.patch_size, num_prefix_tokens=backbone.num_prefix_tokens,
                          train=False, world_size=1, rank=0)  # fmt: skip
    loader.batch_sampler.set_epoch(0)
    if warmup:  # one untimed forward first: one-time initialization (CUDA context, kernels) is not throughput
        with autocast(c_res.train.precision, env.device):
            model(to_device(next(iter(loader)).batch, env.device))
    images = tokens = 0
    forward_s = 0.0
    memory.start()
    t0 = time.perf_counter()
    for m in loader:
        batch, targets = to_device(m.batch, env.device), to_device(m.targets, env.device)
        t_fwd = time.perf_counter()
        with autocast(c_res.train.precision, env.device):
            outputs = model(batch)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        forward_s += time.perf_counter() - t_fwd
        evaluator.process(outputs, targets)
        images += images_of(batch, targets)
        tokens += int(batch.num_kept.sum())
    seconds = time.perf_counter() - t0
    peak, delta = memory.stop()
    return {
        "max_tokens_per_image": c_res.data.max_tokens_per_image,
        "mean_tokens_per_image": tokens / max(images, 1),
        "images": images,
        "images_per_s": images / max(forward_s, 1e-9),
        "eval_seconds": seconds,
        "peak_mem_mb": peak,
        "peak_mem_delta_mb": delta,
        "mem_method": memory.method,
        "metrics": evaluator.metrics(),
    }


@torch.no_grad()
def run_resolution_sweep(
    cfg: DictConfig | Config | str | Path,
    checkpoint: str | Path | None,
    max_res_list: Sequence[int],
    out_dir: str | Path,
    *,
    ema: bool | None = None,
    split: str = "val",
    layouts: Sequence[str] | None = None,
) -> list[dict]:
    """Evaluate ``checkpoint`` at each max resolution (pixels) and image layout; returns one
    row per (layout, resolution) (keys ``sweep_columns(row["format"])``, "format" being the
    ground truth's, "lvis" or "coco") and writes resolution_sweep.json / .csv / .png into
    ``out_dir``. cfg: the run's config (a loaded config, or a YAML path).
    checkpoint: None evaluates the weights the config itself names (an imported detector,
    zero-shot). layouts: "native" packs every image at its own aspect ratio, "square" pads it
    to a square first (HF Owlv2Processor's layout), same weights; default the config's own
    (data.square_pad). ema: as in tools/evaluate.py."""
    if isinstance(cfg, (str, Path)):
        cfg = load_config(cfg)
    c = cfg if isinstance(cfg, Config) else to_object(cfg)
    if c.task != "detection":
        raise ValueError(f"the LVIS resolution sweep evaluates detection configs, got task {c.task!r} (segmentation: tools/eval_seg.py)")
    if not max_res_list:
        raise ValueError("max_res_list is empty")
    layouts = layouts or (("square",) if c.data.square_pad else ("native",))
    bad = sorted(set(layouts) - set(LAYOUTS))
    if bad or not layouts:
        raise ValueError(f"layouts must be taken from {LAYOUTS}, got {list(layouts)}")
    env = init_distributed(c.train.device)
    path = ckpt.resolve(checkpoint) if checkpoint is not None else None
    task, model, backbone, dataset = load_for_evaluation(c, path, ema, env.device, split)
    memory = PeakMemory(env.device)

    rows = []
    for layout in layouts:
        for max_res in sorted(int(r) for r in max_res_list):  # increasing: see the ru_maxrss fallback
            c_res = resolution_config(c, max_res, backbone.patch_size, backbone.num_prefix_tokens, square_pad=layout == "square")
            evaluator = task.build_evaluator()
            stats = evaluate_at(task, model, backbone, dataset, c_res, env, memory, evaluator, warmup=not rows)
            metrics = stats.pop("metrics")
            names = SWEEP_METRICS[evaluator.format]
            rows.append({"layout": layout, "max_res": max_res, "format": evaluator.format, **{k: metrics[k] for k in names}, **stats})
            print(f"{layout} max_res {max_res}: " + " ".join(f"{k} {metrics[k]:.4f}" for k in names[:2])
                  + f", {stats['mean_tokens_per_image']:.0f} tokens/image, {stats['images_per_s']:.1f} images/s, "
                  f"peak {stats['peak_mem_mb']:.0f} MiB", flush=True)  # fmt: skip
    task.cfg = c
    source = str(path) if path is not None else (c.model.hf_owl or c.model.backbone.init.path or "config")
    write_sweep(rows, out_dir, {"checkpoint": source, "split": split, "task": c.task, "patch_size": backbone.patch_size,
                                "device": str(env.device)})  # fmt: skip
    return rows


def write_tables(rows: list[dict], out_dir: str | Path, columns: Sequence[str], info: dict | None = None) -> dict[str, Path]:
    """resolution_sweep.json (info + rows) and .csv (``columns``); returns those paths and the
    .png path for the task's own plot. Shared by the detection and segmentation sweeps."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"resolution_sweep.{k}" for k in ("json", "csv", "png")}
    paths["json"].write_text(json.dumps({**(info or {}), "rows": rows}, indent=1) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({k: r[k] for k in columns} for r in rows)
    return paths


def write_sweep(rows: list[dict], out_dir: str | Path, info: dict | None = None) -> dict[str, Path]:
    """resolution_sweep.json (info + rows), .csv (``sweep_columns`` of the rows' format) and .png
    (AP and APr, COCO: AP and AP50, percent, and images/s with tokens per image, against max
    resolution; one line style per layout)."""
    fmt = rows[0].get("format", "lvis") if rows else "lvis"
    paths = write_tables(rows, out_dir, sweep_columns(fmt), info)

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    res = sorted({r["max_res"] for r in rows})
    fig, (ax, speed) = plt.subplots(1, 2, figsize=(11, 4))
    layouts = list(dict.fromkeys(r.get("layout", "native") for r in rows))
    for layout in layouts:
        mine = [r for r in rows if r.get("layout", "native") == layout]
        line = "-" if layout == "native" else "--"
        suffix = "" if len(layouts) == 1 else f" {layout}"
        for key, marker in zip(("AP", "APr" if fmt == "lvis" else "AP50"), "os"):
            # -1 means "undefined" (no GT in the group): not plotted.
            pts = [(r["max_res"], 100 * r[key]) for r in mine if r[key] >= 0]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker + line, label=key + suffix)
        speed.plot([r["max_res"] for r in mine], [r["images_per_s"] for r in mine], "o" + line, label=f"images/s{suffix}")
        for r in mine:  # the tokens each image cost, next to its speed
            speed.annotate(f"{r['mean_tokens_per_image']:.0f} tok", (r["max_res"], r["images_per_s"]), fontsize=7,
                           textcoords="offset points", xytext=(4, 4))  # fmt: skip
    ax.set_xlabel("max resolution (pixels, longer side)")
    ax.set_ylabel(f"{fmt.upper()} box AP (%)")
    speed.set_xlabel("max resolution (pixels, longer side)")
    speed.set_ylabel("images / s (model forward), tokens per image")
    speed.set_yscale("log")
    for a in (ax, speed):
        a.set_xticks(res)
        a.grid(alpha=0.3)
        a.legend()
    if info and info.get("checkpoint"):
        ax.set_title(f"resolution sweep: {Path(info['checkpoint']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
