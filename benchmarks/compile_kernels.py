"""Compile every kernel specialisation for Hopper (sm_90) ahead of time, without a GPU, and report
registers and stack (spill) bytes per thread.

    python benchmarks/compile_kernels.py          # fp16/bf16/fp32 x D 64/128 x every flag set
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine_info, write_json  # noqa: E402
from knnmem.corpus import recorded_options  # noqa: E402

from knnmem.kernels import aot  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--out", default="benchmarks/results/kernel_compile_sm90.json")
    args = parser.parse_args()
    results = aot.report(aot.specialisations(args.dtypes, args.head_dims, every_flag=True))
    spilling = [r for r in results if r.stack_bytes]
    print(f"{len(results)} specialisations compiled for sm_90; {len(spilling)} use stack (spill); "
          f"registers {min(r.registers for r in results)}..{max(r.registers for r in results)}")
    write_json(args.out, {"machine": machine_info(), "target": "cuda sm_90 (Hopper), 4 warps",
                          "parameters": recorded_options(args), "kernels": [dataclasses.asdict(r) for r in results]})


if __name__ == "__main__":
    main()
