"""Benchmark plumbing: the stage clock, and tools/benchmark_seg.py end to end on tiny data
(its report's structure and internal consistency, never its timings)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from navit_dense.data.resize import budget_grid
import navit_dense.utils.benchmark as benchmark_utils
from navit_dense.utils.benchmark import StageClock

from conftest import load_tool


class FakeTime:
    """A clock that moves only when told: exact stage sums, no sleeping, no flakiness."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class Worker:
    def __init__(self, clock: FakeTime):
        self.clock = clock

    def step(self, seconds: float) -> str:
        self.clock.now += seconds
        return "done"


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(benchmark_utils, "time", fake)
    return fake


def test_stage_clock_times_blocks_and_methods_and_restores_them(fake_time):
    clock, worker = StageClock(), Worker(fake_time)
    with clock("block"):
        fake_time.now += 0.25
    with clock.methods({"step": [(worker, "step")]}):
        assert worker.step(0.5) == "done"
        assert worker.step(0.125) == "done"
        assert "step" in vars(worker)
    assert "step" not in vars(worker)  # the class's method is back
    worker.step(2.0)  # not timed any more
    assert clock.seconds == {"block": 0.25, "step": 0.625}


def test_stage_clock_restores_after_an_exception_and_refuses_instance_attributes():
    clock, worker = StageClock(), Worker(FakeTime())
    with pytest.raises(ZeroDivisionError):
        with clock.methods({"step": [(worker, "step")]}):
            1 / 0
    assert "step" not in vars(worker)
    worker.step = lambda seconds: "patched"
    with pytest.raises(ValueError, match="Worker.step is already an instance attribute"):
        with clock.methods({"step": [(worker, "step")]}):
            pass


def test_benchmark_seg_reports_three_methods_consistently(tmp_path):
    load_tool("make_synthetic_seg").make_synthetic_seg(tmp_path / "data", seed=0, n_train=8, n_val=4, min_side=64, max_side=200)
    tool = load_tool("benchmark_seg")
    out = tmp_path / "bench.json"
    argv = ["--json", str(out), "--csv", str(tmp_path / "bench.csv"), "--plot", str(tmp_path / "bench.png"),
            "--data-root", str(tmp_path / "data"), "--work-dir", str(tmp_path / "work"), "--max-res", "64,96",
            "--train-iters", "2", "--num-images", "4", "--batch", "3",
            "--backbone", "reg_tokens=1"]  # a variant with a prefix token: every path must pack room for it  # fmt: skip
    try:
        assert tool.main(argv) == 0
    finally:
        torch.set_num_threads(1)
    report = json.loads(out.read_text())
    assert report["weights"]["backbone_overrides"] == {"reg_tokens": 1}
    assert report["weights"]["same_function_max_logit_diff"] <= 1e-4
    rows = {(r["max_res"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {(R, m) for R in (64, 96) for m in ("native", "square", "mmseg")}
    for (R, method), row in rows.items():
        assert row["images"] == 4
        stages_ms = sum(row[f"{k}_ms_per_image"] for k in tool.STAGES)
        wall_ms = 1000 * row["seconds"] / row["images"]
        rounding_ms = 0.5 / row["images"] + 0.02  # seconds has 3 decimals, each stage 2
        assert 0 < stages_ms <= wall_ms + rounding_ms  # stages are inside the timed call
        if method == "mmseg":  # its "prepare" is the remainder, so the stages add up to the wall time
            assert stages_ms == pytest.approx(wall_ms, abs=rounding_ms)  # exactly, up to rounding
            assert row["pack_ms_per_image"] == 0
            assert row["agreement_with_mmseg"] == 100
        assert 0 <= row["mIoU"] <= 100
    for R in (64, 96):
        assert rows[R, "square"]["tokens_per_image"] == (R // 16) ** 2
        assert rows[R, "native"]["tokens_per_image"] <= rows[R, "square"]["tokens_per_image"]
        # Counted from the batches the NaViT ran: (a) packs each image's budget grid, (c) pads
        # mmseg's keep-ratio resize to whole patches.
        sizes = report["data"]["image_sizes_hw"]
        grids = [budget_grid(h, w, 16, (R // 16) ** 2, max_side=R) for h, w in sizes]
        padded = [(-(-fh // 16)) * (-(-fw // 16)) for fh, fw in (tool.fit_size(h, w, R) for h, w in sizes)]
        assert rows[R, "native"]["tokens_per_image"] == pytest.approx(sum(gh * gw for gh, gw in grids) / len(sizes), abs=0.05)
        assert rows[R, "mmseg"]["tokens_per_image"] == pytest.approx(sum(padded) / len(sizes), abs=0.05)
        summary = report["summary"][str(R)]
        ratio = rows[R, "mmseg"]["forward_ms_per_image"] / rows[R, "native"]["forward_ms_per_image"]
        assert summary["native_over_mmseg_forward_speed"] == pytest.approx(ratio, abs=0.01)
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_benchmark_seg_rejects_unknown_backbone_fields():
    tool = load_tool("benchmark_seg")
    with pytest.raises(SystemExit, match="reg_token=4"):
        tool.parse_backbone_overrides(["reg_token=4"])
    with pytest.raises(SystemExit, match="fixed here"):
        tool.parse_backbone_overrides(["patch_size=8"])  # the tool's pixel pipeline is P = 16
    assert tool.parse_backbone_overrides(["reg_tokens=4", "qk_norm=true"]) == {"reg_tokens": 4, "qk_norm": True}
