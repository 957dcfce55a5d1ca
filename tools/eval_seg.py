#!/usr/bin/env python
"""Evaluate a segmentation checkpoint at several max resolutions, and draw its predictions.

    python tools/eval_seg.py --config FILE --checkpoint CKPT --max-res 256,384,512 \\
        [--mode whole|slide] [--out DIR] [--visualize N] [--threads T]

At max resolution R (pixels) every image gets a budget of (R / P)^2 patches with its longer
side capped at R (aspect ratio kept); in slide mode the windows are R x R native pixels
(``data.slide_window`` is overridden to follow R) with the config's stride ratio. Per
resolution: mIoU, mAcc, aAcc (mmseg IoUMetric numbers, percent, at the original label size),
mean tokens per image (packed patch tokens / images; all windows in slide mode), images/s and
peak memory. Writes ``resolution_sweep.{json,csv,png}`` (the plot: mIoU and images/s against
R) into --out (default: <run dir>/seg_sweep_<mode>).

Method: ``images_per_s`` = images / model forward time (backbone + decoder, synchronized on
CUDA); upsampling to the original size, argmax and metric updates are excluded, like the
detection sweep's post-processing; ``eval_seconds`` is the whole pass (decoding, packing,
forward, metrics). Peak memory: navit_dense.engine.resolution_sweep.PeakMemory — on CUDA
``max_memory_allocated``; on CPU the process's peak resident set size (VmHWM, reset before
each resolution; ``peak_mem_delta_mb`` subtracts the RSS at the start of the pass).

``--visualize N``: PNGs of the first N validation images (image | ground truth | prediction,
class colours blended over the image, ignored pixels left uncoloured) at the largest R, in
<out>/vis/. Single process; run it outside torchrun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import navit_dense.tasks  # noqa: F401  (registers the built-in tasks)
from navit_dense.engine import checkpoint as ckpt
from navit_dense.engine.config import Config, ConfigError, load_config, to_object
from navit_dense.engine.distributed import init_distributed
from navit_dense.engine.trainer import load_for_evaluation
from navit_dense.engine.resolution_sweep import PeakMemory, evaluate_at, resolution_config, write_tables

METRICS = ("mIoU", "mAcc", "aAcc")
COLUMNS = ("max_res", "mode", "max_tokens_per_image", "mean_tokens_per_image", *METRICS, "images", "images_per_s",
           "eval_seconds", "peak_mem_mb", "peak_mem_delta_mb", "mem_method")  # fmt: skip


@torch.no_grad()
def run_seg_sweep(cfg, checkpoint: str | Path, max_res_list: Sequence[int], out_dir: str | Path | None = None, *,
                  mode: str | None = None, visualize: int = 0, ema: bool | None = None, split: str = "val") -> list[dict]:  # fmt: skip
    """One row per max resolution (keys COLUMNS); writes the JSON / CSV / PNG (and the
    visualizations) into out_dir."""
    c = cfg if isinstance(cfg, Config) else to_object(load_config(cfg) if isinstance(cfg, (str, Path)) else cfg)
    mode = mode or c.data.eval_mode
    if not max_res_list:
        raise ValueError("max_res_list is empty")
    env = init_distributed(c.train.device)
    path = ckpt.resolve(checkpoint)
    out = Path(out_dir) if out_dir else path.parent.parent / f"seg_sweep_{mode}"
    if c.task != "segmentation":
        raise ValueError(f"eval_seg.py evaluates segmentation configs, got task {c.task!r}")
    task, model, backbone, dataset = load_for_evaluation(c, path, ema, env.device, split)
    memory = PeakMemory(env.device)

    rows, resolutions = [], sorted(int(r) for r in max_res_list)  # increasing: see PeakMemory's ru_maxrss fallback
    for max_res in resolutions:
        # Slide windows follow R (slide_window=0: windows of max_side pixels).
        c_res = resolution_config(c, max_res, backbone.patch_size, backbone.num_prefix_tokens, eval_mode=mode, slide_window=0)
        evaluator = task.build_evaluator(keep=visualize if max_res == resolutions[-1] else 0)
        stats = evaluate_at(task, model, backbone, dataset, c_res, env, memory, evaluator, warmup=not rows,
                            images_of=lambda batch, targets: len(targets["labels"]))  # images, not windows  # fmt: skip
        metrics = stats.pop("metrics")
        rows.append({"max_res": max_res, "mode": mode, **{k: metrics[k] for k in METRICS}, **stats})
        print(f"max_res {max_res} ({mode}): mIoU {metrics['mIoU']:.2f} mAcc {metrics['mAcc']:.2f} aAcc {metrics['aAcc']:.2f}, "
              f"{stats['mean_tokens_per_image']:.0f} tokens/image, {stats['images_per_s']:.1f} images/s, peak {stats['peak_mem_mb']:.0f} MiB",
              flush=True)  # fmt: skip
    task.cfg = c
    info = {"checkpoint": str(path), "split": split, "task": c.task, "patch_size": backbone.patch_size, "device": str(env.device),
            "num_classes": c.data.num_classes, "threads": torch.get_num_threads()}  # fmt: skip
    write_sweep(rows, out, info)
    if visualize:
        meta = task.meta
        names = task.class_names() or [f"class {k}" for k in range(c.data.num_classes)]
        write_visualizations(dataset, evaluator.predictions, out / "vis", palette_for(c.data.num_classes, meta.get("palette")), names,
                             ignore_index=c.data.ignore_index, title=f"max_res {resolutions[-1]}, {mode}")  # fmt: skip
    return rows


def write_sweep(rows: list[dict], out_dir: str | Path, info: dict | None = None) -> dict[str, Path]:
    """resolution_sweep.json (info + rows), .csv (COLUMNS) and .png (mIoU and images/s against R)."""
    paths = write_tables(rows, out_dir, COLUMNS, info)

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    res = [r["max_res"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(res, [r["mIoU"] for r in rows], "o-", color="tab:blue", label="mIoU")
    ax.set_xlabel("max resolution (pixels, longer side)")
    ax.set_ylabel("mIoU (%)", color="tab:blue")
    ax.set_xticks(res)
    ax.grid(alpha=0.3)
    speed = ax.twinx()
    speed.plot(res, [r["images_per_s"] for r in rows], "s--", color="tab:orange", label="images/s")
    speed.set_ylabel("images / s (model forward)", color="tab:orange")
    speed.set_ylim(bottom=0)
    mode = rows[0]["mode"] if rows else ""
    name = Path(info["checkpoint"]).parent.parent.name if info and info.get("checkpoint") else ""
    ax.set_title(f"segmentation resolution sweep ({mode}) {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


# ---- visualization ---------------------------------------------------------------------------
def palette_for(num_classes: int, palette: list | None = None) -> np.ndarray:
    """uint8 [K, 3]: the dataset's palette when it has one for every class, else fixed
    well-separated colours (golden-ratio hues)."""
    if palette is not None and len(palette) >= num_classes:
        return np.asarray(palette[:num_classes], dtype=np.uint8)
    import colorsys

    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    values = 0.95 - 0.125 * (np.arange(num_classes) % 3)  # vary brightness too, so neighbours in hue differ
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, v)] for h, v in zip(hues, values)], dtype=np.uint8)


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, ignore_index: int = 255, alpha: float = 0.55) -> np.ndarray:
    """HWC float [0, 1] image with class colours blended in where the label is a class."""
    valid = (label != ignore_index) & (label >= 0) & (label < len(palette))
    colours = palette[np.where(valid, label, 0)].astype(np.float32) / 255
    return np.where(valid[..., None], (1 - alpha) * image + alpha * colours, image)


def write_visualizations(dataset, predictions: dict[int, torch.Tensor], out_dir: Path, palette: np.ndarray, names: list[str],
                         ignore_index: int = 255, title: str = "") -> list[Path]:  # fmt: skip
    """One PNG per kept prediction: image | ground truth | prediction, with a legend of the
    classes present in either."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in sorted(predictions):
        image, label = dataset.unnormalized(index)
        img = image.permute(1, 2, 0).numpy()
        gt, pred = label.numpy(), predictions[index].numpy().astype(np.int64)
        valid = gt != ignore_index
        acc = float((pred[valid] == gt[valid]).mean()) * 100 if valid.any() else float("nan")
        H, W = gt.shape
        fig, axes = plt.subplots(1, 3, figsize=(3 * 3.2 * W / max(H, W) + 0.5, 3.2 * H / max(H, W) + 1.2))
        for ax, picture, caption in zip(axes, (img, overlay(img, gt, palette, ignore_index), overlay(img, pred, palette, ignore_index)),
                                        ("image", "ground truth", f"prediction (pixel acc {acc:.1f}%)")):  # fmt: skip
            ax.imshow(np.clip(picture, 0, 1))
            ax.set_title(caption, fontsize=9)
            ax.axis("off")
        present = sorted(set(np.unique(gt[valid]).tolist()) | set(np.unique(pred).tolist()))
        handles = [Patch(color=palette[k] / 255, label=names[k]) for k in present if 0 <= k < len(palette)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
        fig.suptitle(f"{Path(dataset.base.samples[index][0]).name}  {title}", fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = out_dir / f"{index:04d}_{Path(dataset.base.samples[index][0]).stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's segmentation YAML")
    parser.add_argument("--checkpoint", required=True, help="a step_N directory, checkpoints/{last,best}, or a run directory")
    parser.add_argument("--max-res", default="", help="comma-separated max resolutions in pixels (default: the config's budget side)")
    parser.add_argument("--mode", choices=("whole", "slide"), help="evaluation mode (default: the config's data.eval_mode)")
    parser.add_argument("--out", help="output folder (default: <run dir>/seg_sweep_<mode>)")
    parser.add_argument("--visualize", type=int, default=0, metavar="N", help="write PNGs of the first N validation images")
    parser.add_argument("--split", default="val")
    parser.add_argument("--weights", choices=("auto", "ema", "model"), default="auto", help="auto: EMA weights when the checkpoint has them")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (on a loaded machine 1 can be much faster)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=/data/ade")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        c = to_object(load_config(args.config, args.overrides))
        if args.max_res:
            max_res = [int(v) for v in args.max_res.split(",") if v.strip()]
        else:
            patch = c.model.backbone.patch_size or 16
            max_res = [int(c.data.max_tokens_per_image**0.5) * patch]
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    try:
        run_seg_sweep(c, args.checkpoint, max_res, args.out, mode=args.mode, visualize=args.visualize,
                      ema={"auto": None, "ema": True, "model": False}[args.weights], split=args.split)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
