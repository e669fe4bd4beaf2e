"""The GPU suite's CPU rehearsal: every step of benchmarks/gpu_suite.py runs on tiny shapes (the
kernel in Triton's interpreter), so that a lent GPU is used for measurement, not debugging."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_writes_what_comes_back(tmp_path):
    done = subprocess.run([sys.executable, SUITE, "--rehearse", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "suite.json").read_text())
    assert list(summary["steps"]) == ["env", "kernel_tests", "kernel_bench", "store", "train", "cost"]
    assert all(s["status"] == "ok" for s in summary["steps"].values()), summary
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 8 and all(f.replace(".", "").replace("_", "").isalnum() for f in files), files  # what returns
    bench = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert bench["kernel"] and {"fused_fwd_us", "fused_bwd_us", "memory_branch_GBps"} <= set(bench["results"][0])
    tests = json.loads((tmp_path / "kernel_tests.json").read_text())
    assert tests["tests"] >= 3 and tests["failures"] == tests["errors"] == 0
    store = json.loads((tmp_path / "store.json").read_text())
    assert {r["spec"] for r in store["sweep"]} == {"exact", "exact/float16"}
    assert all(r["recall@32"] > 0.99 for r in store["sweep"])
    train = json.loads((tmp_path / "train.json").read_text())
    assert set(train["rehearse"]["table"]["configs"]) == {"vanilla", "xl", "memory-128+xl"}
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert set(cost["configs"]) == {"xl", "long", "xl+memory"} and cost["configs"]["xl"]["time_vs_xl"] == 1.0


def test_sweeps_stop_at_their_deadline():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_kernel

    result = bench_kernel.sweep(bench_kernel.GRIDS["cpu"], "cpu", deadline=0.0)
    assert result["results"] == [] and result["skipped_at_deadline"] == len(bench_kernel.points(bench_kernel.GRIDS["cpu"]))


def test_suite_refuses_a_cpu_without_rehearse_and_a_bad_budget():
    import torch

    cases = [(["--rehearse", "--budget", "0"], "--budget must be > 0")]
    if not torch.cuda.is_available():
        cases.append(([], "no CUDA device"))
    for extra, message in cases:
        done = subprocess.run([sys.executable, SUITE, *extra], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_budget_is_shared_by_the_steps_that_run_in_the_suites_order():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_suite

    every = gpu_suite.deadlines(list(gpu_suite.STEPS), 480.0, start=0.0)
    assert list(every) == list(gpu_suite.STEPS) and every["cost"] == pytest.approx(480.0)
    assert every["env"] == pytest.approx(gpu_suite.SHARES["env"] * 480.0 / sum(gpu_suite.SHARES.values()))
    two = gpu_suite.deadlines(["store", "env"], 60.0, start=100.0)
    assert list(two) == ["env", "store"] and two["store"] == pytest.approx(160.0)  # all 60 s, not a share of 480
