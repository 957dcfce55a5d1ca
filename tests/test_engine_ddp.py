"""Token-balanced sharding, and DDP (torchrun, 2 CPU processes, gloo) against one process on
the same global batches."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from navit_dense.data import ResolutionSampler, pack_images
from navit_dense.engine.sampler import TokenBudgetSampler
from navit_dense.data.synthetic.shapes import ShapesDataset

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "classification" / "toy.yaml"


def make_sampler(dataset, world_size=1, rank=0, **kw) -> TokenBudgetSampler:
    args = dict(patch_size=8, max_tokens_per_image=24, tokens_per_batch=200, grad_accum=2, seed=3)
    args.update(kw)
    return TokenBudgetSampler([dataset.image_size(i) for i in range(len(dataset))], world_size=world_size, rank=rank, **args)


def test_shards_partition_the_global_batch_with_balanced_tokens():
    dataset = ShapesDataset(120, 16, 64, seed=0, train=True)
    single = make_sampler(dataset)
    ranks = [make_sampler(dataset, 2, r) for r in range(2)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        _, costs, steps = single.plan(epoch)
        shards = [list(s) for s in ranks]
        assert len(shards[0]) == len(shards[1]) == len(steps) * 2  # same number of micro-batches on every rank
        flat = [micro for step in steps for micro in step]
        assert [[k.index for k in b] for b in single] == flat
        for micro, a, b in zip(flat, *shards):
            assert a and b and sorted(k.index for k in a + b) == sorted(micro)  # a partition, no image lost
            load_a, load_b = sum(costs[k.index] for k in a), sum(costs[k.index] for k in b)
            assert abs(load_a - load_b) <= max(costs[i] for i in micro)  # near-equal tokens per rank
            assert sum(costs[i] for i in micro) <= 200
    assert single.plan(0)[2] != single.plan(1)[2]  # reshuffled each epoch


def test_token_cost_is_known_before_decoding_and_exact():
    dataset = ShapesDataset(40, 16, 64, seed=0, train=True)
    sampler = make_sampler(dataset, resolution=ResolutionSampler(16, 48, multiple=8), grad_accum=1)
    sampler.set_epoch(0)
    budgets, costs, _ = sampler.plan(0)
    assert len(set(budgets)) > 1 and budgets != sampler.budgets(1)  # per-image budgets, resampled per epoch
    for keys in sampler:
        batch = pack_images([dataset[k.index]["image"] for k in keys], 8, seq_len=64, max_tokens=[k.budget for k in keys])
        assert batch.run_lengths.tolist() == [costs[k.index] for k in keys]


def test_start_step_resumes_the_same_sequence():
    dataset = ShapesDataset(80, 16, 64, seed=0, train=True)
    sampler = make_sampler(dataset, 2, 1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_step=3)
    assert list(sampler) == full[3 * 2 :]


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _records(run: Path, kind: str) -> dict[int, dict]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in rows if r["kind"] == kind}


def test_torchrun_two_processes_match_one_process(tmp_path):
    # Varied image sizes (token balancing matters), accumulation, EMA (evaluated: every rank's
    # copy must start from rank 0's weights), eval with merged evaluator states.
    overrides = [
        "data.train_size=64",
        "data.val_size=24",
        "data.image_min_side=16",
        "data.image_max_side=56",
        "data.max_tokens_per_image=32",
        "data.seq_len=96",
        "data.tokens_per_batch=200",
        "train.grad_accum=2",
        "train.steps=4",
        "train.log_every=1",
        "train.eval_every=2",
        "train.ema_decay=0.9",
        "optim.warmup_steps=1",
        "data.token_drop.mode=constant",  # per-image drop seeds: independent of the sharding
        "data.token_drop.rate=0.25",
    ]
    train_py = str(ROOT / "tools" / "train.py")
    _run([sys.executable, train_py, "--config", str(TOY), "--output-dir", str(tmp_path / "one"), *overrides])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", train_py, "--config", str(TOY), "--output-dir", str(tmp_path / "two"), *overrides])

    one, two = _records(tmp_path / "one", "train"), _records(tmp_path / "two", "train")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert one[step]["images"] == two[step]["images"] and one[step]["tokens"] == two[step]["tokens"]
        assert math.isclose(one[step]["loss"], two[step]["loss"], rel_tol=1e-5), step
        assert math.isclose(one[step]["grad_norm"], two[step]["grad_norm"], rel_tol=1e-4), step
    eval_one, eval_two = _records(tmp_path / "one", "eval"), _records(tmp_path / "two", "eval")
    assert sorted(eval_one) == sorted(eval_two) == [2, 4]
    for step in eval_one:
        assert eval_two[step]["images"] == 24 and eval_one[step]["accuracy"] == eval_two[step]["accuracy"]
        assert math.isclose(eval_one[step]["loss"], eval_two[step]["loss"], rel_tol=1e-5)
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "one" / "checkpoints" / "last" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "two" / "checkpoints" / "last" / f"{name}.safetensors"))
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (name, k)
    meta = json.loads((tmp_path / "two" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(meta["rng"]) == 2  # both ranks' RNG states are saved
