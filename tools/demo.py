#!/usr/bin/env python
"""The project's main job, end to end on a CPU in a few minutes (``make demo``):

1. generate a synthetic LVIS-v1-format dataset of textured shapes with rare / common /
   frequent classes (tools/make_synthetic_lvis.py) into OUT/data, unless it is already there
   with the same parameters;
2. evaluate the untrained tiny NaViT OWL detector with the LVIS protocol;
3. train it from configs/detection/owl_navit_tiny_synthetic_lvis.yaml with the engine: on a
   CPU one single-threaded process per core (torch.distributed.run + gloo DDP, the global
   batch split across them), evaluated at the end;
4. print untrained vs trained AP, AP50, APr, APc, APf;
5. draw its detections on a few val images (boxes, class names, scores; ground truth dashed)
   into OUT/detections.png; OUT/results.json keeps the numbers and timings.

    python tools/demo.py [--out runs/demo] [--procs N] [--data KEY=VALUE ...] [key=value ...]   # config overrides

Each run retrains from scratch in OUT/owl_tiny (the previous run there is replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.ops import nms

import navit_dense.tasks  # noqa: F401  (registers the built-in tasks)
from navit_dense.data.decode import load_image
from navit_dense.data.synthetic.lvis_shapes import LvisShapesSpec, generate
from navit_dense.engine.config import load_config
from navit_dense.engine.optim import find_backbone
from navit_dense.engine.task import PackPlan
from navit_dense.engine.trainer import Trainer
from navit_dense.models.heads.owl import postprocess

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "detection" / "owl_navit_tiny_synthetic_lvis.yaml"
# 30 shape x colour classes, r/c/f 8/11/11: rare classes have at most 20 of the 1000 train images,
# common ones at most 100. Shapes span 2-7 patches at the demo's 144-token budget (radius 15-35% of
# the shorter side), so their outline is visible to a 16-pixel-patch ViT.
DATA_PARAMS = {"train_images": 1000, "val_images": 100, "num_classes": 30, "min_side": 96, "max_side": 320,
               "min_radius": 0.15, "max_radius": 0.35, "seed": 0}
TABLE_METRICS = ("AP", "AP50", "APr", "APc", "APf")


def make_data(out: Path, params: dict) -> tuple[Path, float]:
    """Generate the dataset unless OUT/data holds one made with the same parameters."""
    stamp = out / "params.json"
    t0 = time.perf_counter()
    files = [out / "lvis_v1_train.json", out / "lvis_v1_val.json"]
    if stamp.is_file() and json.loads(stamp.read_text()) == params and all(f.is_file() for f in files):
        print(f"data: reusing {out}")
        return out, 0.0
    if out.exists():
        shutil.rmtree(out)
    generate(LvisShapesSpec(out=out, **params))
    stamp.write_text(json.dumps(params))
    return out, time.perf_counter() - t0


def train_processes(procs: int, run_dir: Path, overrides: list[str]) -> None:
    """Train the demo config with ``procs`` single-threaded gloo DDP processes (tools/train.py
    under torch.distributed.run). On a small CPU this beats one process with a thread per core:
    the Python-side work of a step (loss matching, packing, optimizer bookkeeping) runs on every
    core at once instead of leaving the other cores idle, and no thread waits on a descheduled
    sibling when the machine is busy."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(ROOT / "tools" / "train.py"), "--config", str(CONFIG), f"output_dir={run_dir}", *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"training with {procs} processes: {' '.join(cmd[2:5])} ...", flush=True)
    done = subprocess.run(cmd, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"training failed (exit code {done.returncode}); its log is in {run_dir}")


def table(untrained: dict, trained: dict) -> str:
    lines = [f"{'':<10}" + "".join(f"{k:>8}" for k in TABLE_METRICS), "-" * (10 + 8 * len(TABLE_METRICS))]
    for name, m in (("untrained", untrained), ("trained", trained)):
        lines.append(f"{name:<10}" + "".join(f"{100 * m[k]:8.2f}" if m[k] >= 0 else f"{'-':>8}" for k in TABLE_METRICS))
    lines.append("(LVIS v1 box AP in percent on the synthetic val split; APr/APc/APf: rare/common/frequent classes)")
    return "\n".join(lines)


@torch.no_grad()
def draw_detections(trainer: Trainer, path: Path, num_images: int = 6, score_thresh: float = 0.2, max_dets: int = 8) -> None:
    """Predictions (solid, 'name (frequency) score') and ground truth (dashed) on val images,
    those holding rare classes first. For a readable picture only the best-scoring box per
    location is drawn (class-agnostic NMS) above a score floor; the metrics use the raw top 300."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    task, c = trainer.task, trainer.cfg
    model = (trainer.ema.module if trainer.ema is not None else trainer.model).eval()
    dataset = task.build_dataset("val")
    cats = dataset.categories
    rare = set(cats.labels_with_frequency("r").tolist())
    labels = dataset.image_labels()
    order = sorted(range(len(dataset)), key=lambda i: (not (labels[i] & rare), i))[:num_images]
    samples = [dataset[i] for i in order]
    _, backbone = find_backbone(model)
    plan = PackPlan(max_tokens=[c.data.max_tokens_per_image] * len(samples), seed=0, patch_size=backbone.patch_size,
                    seq_len=c.data.seq_len, num_prefix_tokens=backbone.num_prefix_tokens, algorithm=c.data.packing,
                    token_drop=None)  # fmt: skip
    batch, targets = task.collate(samples, plan)
    out = model(batch)
    scale = torch.tensor([t["scale"] for t in targets])
    dets = postprocess(out.owl, out.batch, topk=100, scale=scale)
    # Draw as many boxes as the image has objects (class-agnostic NMS first), plus any other box
    # above the score floor: a weak model still shows where its best guesses are.
    keep_n = [max(len(t["labels"]), 1) for t in targets]
    dets = [
        {k: v[kept[: max(n, int((d["scores"][kept] >= score_thresh).sum()))][:max_dets]] for k, v in d.items()}
        for d, n in zip(dets, keep_n)
        for kept in [nms(d["boxes"], d["scores"], 0.4)]
    ]

    cols = 3
    rows = -(-len(samples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.6 * rows), squeeze=False)
    palette = plt.get_cmap("tab10")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, d in zip(axes.flat, order, dets):
        record = dataset.images[i]
        ax.imshow(load_image(dataset.image_root / record.file_name).permute(1, 2, 0).numpy())
        for a in record.annotations:
            x, y, w, h = a.bbox
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ls="--", lw=1.0, ec="white"))
        for j, (box, score, label) in enumerate(zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())):
            x0, y0, x1, y1 = box
            colour = palette(j % 10)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, ec=colour))
            freq = cats.frequency[label] or ""
            ax.text(x0, y0 - 2, f"{cats.names[label]} ({freq}) {score:.2f}", fontsize=7, color="white",
                    bbox=dict(facecolor=colour, alpha=0.8, pad=1, lw=0))  # fmt: skip
        present = ", ".join(f"{cats.names[lb]} ({cats.frequency[lb]})" for lb in sorted(labels[i]))
        ax.set_title(f"image {record.id}: {present}", fontsize=7)
    fig.suptitle(f"trained detector: top detections (one per object, plus any with score >= {score_thresh}; solid), ground truth (dashed)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="runs/demo", help="output directory (data, run, results, PNG)")
    parser.add_argument("--procs", type=int, default=0,
                        help="training processes on a CPU (0: one per core, at most 4); each runs one torch thread. 1: train in "
                             "this process with one thread per core. A GPU always trains in this process")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help=f"dataset parameter (LvisShapesSpec field), repeatable; defaults {DATA_PARAMS}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    procs = 1 if torch.cuda.is_available() else (args.procs or min(cores, 4))
    if procs < 1:
        parser.error(f"--procs must be >= 0, got {args.procs}")
    torch.set_num_threads(cores)
    t_start = time.perf_counter()
    out = Path(args.out)
    params = dict(DATA_PARAMS)
    for item in args.data:
        key, _, value = item.partition("=")
        if key not in LvisShapesSpec.__dataclass_fields__ or key == "out" or not value:
            parser.error(f"--data {item!r}: expected KEY=VALUE with KEY a field of LvisShapesSpec")
        params[key] = type(getattr(LvisShapesSpec(out=""), key))(value)
    data, data_s = make_data(out / "data", params)

    run_dir = out / "owl_tiny"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    paths = [f"data.{split}_json={data}/lvis_v1_{split}.json" for split in ("train", "val")]
    paths += [f"data.{split}_images={data}/images" for split in ("train", "val")]
    overrides = [*paths, *args.overrides]
    cfg = load_config(CONFIG, [f"output_dir={run_dir}", *overrides])

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the untrained model's evaluation is not part of the run
        scratch = Trainer(load_config(CONFIG, [f"output_dir={tmp}/untrained", *overrides]))
        untrained = scratch.evaluate()
        scratch.logger.close()
        del scratch
    eval_s = time.perf_counter() - t0
    print("untrained: " + "  ".join(f"{k} {100 * untrained[k]:.2f}" for k in TABLE_METRICS), flush=True)
    t0 = time.perf_counter()
    if procs > 1:
        train_processes(procs, run_dir, overrides)
        trainer = Trainer(cfg, resume=True)  # the finished run: its last checkpoint and summary
        summary = trainer.finished_summary
        if summary is None:
            raise RuntimeError(f"{run_dir}: training ended without a summary.json")
    else:
        trainer = Trainer(cfg)
        summary = trainer.fit()  # evaluates at the end (train.eval_every=0)
    train_s = time.perf_counter() - t0
    trained = summary["final_metrics"]

    png = out / "detections.png"
    draw_detections(trainer, png)
    total = time.perf_counter() - t_start
    print()
    print(table(untrained, trained))
    timings = {"train_processes": procs, "data_s": round(data_s, 1), "untrained_eval_s": round(eval_s, 1), "train_and_eval_s": round(train_s, 1), "total_s": round(total, 1)}
    (out / "results.json").write_text(json.dumps({"untrained": untrained, "trained": trained, "timings": timings,
                                                  "data": params, "config": str(CONFIG), "overrides": args.overrides,
                                                  "checkpoint": str(run_dir / "checkpoints" / "last")}, indent=1))  # fmt: skip
    print(f"\ndetections: {png}\nresults: {out / 'results.json'}\ncheckpoint: {run_dir / 'checkpoints' / 'last'}")
    print("time: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
