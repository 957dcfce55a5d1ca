"""Token-balanced sharding, and DDP (torchrun, 2 CPU processes, gloo) against one process on
the same global batches."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
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
        flat = [micro for step in steps for micro in step]
        assert len(shards[0]) == len(shards[1]) == len(flat)  # same number of micro-batches on every rank
        assert all(len(step) == 2 for step in steps[:-1]) and 1 <= len(steps[-1]) <= 2  # the epoch's last step may be short
        assert sorted(i for micro in flat for i in micro) == list(range(120))  # nothing dropped
        assert [[k.index for k in b] for b in single] == flat
        for micro, a, b in zip(flat, *shards):
            assert a and b and sorted(k.index for k in a + b) == sorted(micro)  # a partition, no image lost
            load_a, load_b = sum(costs[k.index] for k in a), sum(costs[k.index] for k in b)
            assert abs(load_a - load_b) <= max(costs[i] for i in micro)  # near-equal tokens per rank
            # Within the budget, except the last micro-batch when a last single image joined it.
            assert sum(costs[i] for i in micro) <= 200 or (micro is flat[-1] and sum(costs[i] for i in micro[:-1]) <= 200)
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


def _launcher(tmp_path: Path) -> str:
    """tools/train.py with the test tasks of test_run_robustness registered (for torchrun)."""
    script = tmp_path / "launch.py"
    train_py = str(ROOT / "tools" / "train.py")
    script.write_text(
        f"import runpy, sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        f"import test_run_robustness  # noqa: F401  (registers the robustness_test task)\n"
        f"sys.argv[0] = {train_py!r}\nrunpy.run_path({train_py!r}, run_name='__main__')\n"
    )
    return str(script)


def test_a_rank_with_only_skipped_samples_neither_hangs_nor_changes_the_step(tmp_path):
    # Two same-size images per micro-batch, so one per rank; the 1x1 ones are skipped, which
    # leaves a rank with an empty micro-batch (or a whole step empty on one rank, or everywhere).
    overrides = [
        "task=robustness_test",
        "data.train_size=16",
        "data.tiny_train=[1, 2, 3, 6, 7, 11]",
        "data.val_size=0",
        "data.image_min_side=32",
        "data.image_max_side=32",
        "data.max_tokens_per_image=16",
        "data.seq_len=64",
        "data.tokens_per_batch=32",
        "train.grad_accum=2",
        "train.steps=6",
        "train.log_every=1",
        "optim.warmup_steps=1",
    ]
    launch = _launcher(tmp_path)
    _run([sys.executable, launch, "--config", str(TOY), "--output-dir", str(tmp_path / "one"), *overrides])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", launch, "--config", str(TOY), "--output-dir", str(tmp_path / "two"), *overrides])
    one, two = _records(tmp_path / "one", "train"), _records(tmp_path / "two", "train")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
    assert any(r["images"] % 2 for r in one.values())  # some rank had an empty micro-batch
    for step in one:
        assert one[step]["images"] == two[step]["images"]
        assert math.isclose(one[step]["loss"], two[step]["loss"], rel_tol=1e-5), step
        assert math.isclose(one[step]["grad_norm"], two[step]["grad_norm"], rel_tol=1e-4), step
    a = load_file(str(tmp_path / "one" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    summary_one, summary_two = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert summary_one["skipped_by_reason"] == summary_two["skipped_by_reason"] and summary_two["skipped_samples"] > 0


def _rank_pids(token: str) -> dict[int, int]:
    """{rank: pid} of the torchrun workers started with NAVIT_TEST_RUN=token in their environment."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            env = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except (OSError, ValueError):
            continue
        if env.get(b"NAVIT_TEST_RUN") == token.encode() and b"LOCAL_RANK" in env:
            found[int(env[b"RANK"])] = int(proc.name)
    return found


def test_a_stopped_rank_ends_the_run_with_a_message(tmp_path):
    run = tmp_path / "run"
    token = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "tools" / "train.py"), "--config", str(TOY),
           "--output-dir", str(run), "data.train_size=32", "data.val_size=0", "data.image_min_side=16", "data.image_max_side=32",
           "data.max_tokens_per_image=16", "data.seq_len=64", "data.tokens_per_batch=64", "train.steps=100000", "train.log_every=1",
           "train.ckpt_every=100000", "train.collective_timeout_s=3"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), NAVIT_TEST_RUN=token)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        deadline = time.monotonic() + 240  # a hang fails the test instead of blocking it
        while time.monotonic() < deadline and proc.poll() is None:
            pids = _rank_pids(token)
            metrics = run / "metrics.jsonl"
            if stopped is None and len(pids) == 2 and metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                stopped = pids[1]
                os.kill(stopped, signal.SIGSTOP)  # alive but silent: the others wait for it in a collective
            if stopped is not None and 0 not in _rank_pids(token):
                os.kill(stopped, signal.SIGKILL)  # rank 0 gave up; spare torchrun its grace period for the stopped one
                break
            time.sleep(0.1)
        assert stopped is not None and 0 not in _rank_pids(token), "rank 0 is still waiting for the stopped rank"
        _, err = proc.communicate(timeout=120)
    finally:
        for pid in _rank_pids(token).values():
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 0: a collective operation with the other ranks failed or waited longer than train.collective_timeout_s=3 s" in err
