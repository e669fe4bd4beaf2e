"""Ahead-of-time compilation of the kernels for an NVIDIA GPU, on any machine (no GPU needed).

Triton compiles a kernel for a named target (`GPUTarget("cuda", 90, 32)`: Hopper) and its bundled
`cuobjdump -res-usage` reads registers, stack and spill bytes from the cubin. `report()` compiles
the specialisations the library launches, with the launch's own block sizes and options, so a
kernel that would spill on a GPU is caught by a test on a laptop.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from . import knn_attention as K

HOPPER = GPUTarget("cuda", 90, 32)
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@dataclass
class Compiled:
    kernel: str
    dtype: str
    head_dim: int
    flags: dict
    registers: int
    stack_bytes: int  # per thread; these kernels keep no local arrays, so > 0 means register spills
    seconds: float


def _signature(fn, types: dict, constexprs: dict):
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = types[name]
            if types[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the cubin's kernel, from the bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text[:200]}")
    return int(match.group(1)), int(match.group(2))


def compile_kernel(name: str, dtype: str, head_dim: int, flags: dict, target: GPUTarget = HOPPER) -> Compiled:
    """Compile one launch of kernel `name` ("fwd", "dq", "dkdv") as `knnmem.kernels` launches it."""
    fn, types, constexprs, options = K.launch_spec(name, DTYPES[dtype], head_dim, **flags)
    signature, attrs = _signature(fn, types, constexprs)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    seconds = time.perf_counter() - start
    registers, stack = _usage(compiled.asm["cubin"])
    return Compiled(name, dtype, head_dim, flags, registers, stack, seconds)


def specialisations(dtypes=("fp16", "bf16"), head_dims=(64, 128), every_flag: bool = False) -> list[tuple]:
    """(kernel, dtype, head dim, flags) to compile: every flag combination, or the heaviest path of
    each kernel plus the memory-branch-only launch (flags change little of the register budget)."""
    specs = []
    for dtype in dtypes:
        for D in head_dims:
            for name, flag_sets in K.launch_flags(every_flag).items():
                specs += [(name, dtype, D, flags) for flags in flag_sets]
    return specs


def report(specs: list[tuple], target: GPUTarget = HOPPER) -> list[Compiled]:
    results = []
    for name, dtype, D, flags in specs:
        c = compile_kernel(name, dtype, D, flags, target)
        results.append(c)
        print(f"{name:<5} {dtype} D={D:<4} {str(flags):<75} regs {c.registers:>3}  stack {c.stack_bytes:>5} B  "
              f"({c.seconds:.1f} s)", flush=True)
    return results


def main() -> None:
    """`python -m knnmem.kernels.aot [--every-flag] [--dtypes ...] [--head-dims ...]`: one JSON line
    per compiled specialisation (Triton's interpreter must be off: TRITON_INTERPRET unset)."""
    import argparse
    import dataclasses
    import json

    parser = argparse.ArgumentParser(prog="python -m knnmem.kernels.aot")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--every-flag", action="store_true")
    args = parser.parse_args()
    for name, dtype, D, flags in specialisations(args.dtypes, args.head_dims, args.every_flag):
        print(json.dumps(dataclasses.asdict(compile_kernel(name, dtype, D, flags))), flush=True)


if __name__ == "__main__":
    main()
