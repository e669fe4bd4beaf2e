"""The kernels compiled ahead of time for Hopper (sm_90), on this machine, without a GPU:
every launch (all flag sets) of the main dtypes (fp16, bf16) and head dims (64, 128) must fit the register
file (no spills). The compile runs in a subprocess, since the tests run Triton's interpreter."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not importable")


def _has_cuda_backend() -> bool:
    from triton.backends import backends

    return "nvidia" in backends


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _has_cuda_backend(), reason="this Triton build has no CUDA backend to compile for")]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "knnmem.kernels.aot", "--every-flag"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_kernel_compiles_for_hopper_without_spills(compiled):
    for c in compiled:
        print(f"{c['kernel']:<5} {c['dtype']} D={c['head_dim']:<4} {c['flags']}: "
              f"{c['registers']} registers, {c['stack_bytes']} B stack")
    kinds = {(c["kernel"], c["dtype"], c["head_dim"]) for c in compiled}
    assert kinds == {(k, t, d) for k in ("fwd", "dq", "dkdv") for t in ("fp16", "bf16") for d in (64, 128)}
    spilling = [c for c in compiled if c["stack_bytes"]]
    assert not spilling, f"kernels spill to local memory: {spilling}"
    assert max(c["registers"] for c in compiled) <= 255  # the per-thread maximum: more would spill
