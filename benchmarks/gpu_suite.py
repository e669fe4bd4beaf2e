"""The GPU suite: everything knnmem needs a GPU to measure, in one command, in order of value.

    python benchmarks/gpu_suite.py --out $OUT           # one H100/H200: about 8 minutes in all
    python benchmarks/gpu_suite.py --rehearse           # a CPU: every step on tiny shapes (minutes)

On the GPU machine, with its own torch/triton/transformers and no FAISS, nothing is downloaded:
    pip install --no-deps --no-build-isolation -e . && python benchmarks/gpu_suite.py --out $OUT

Steps, each under its share of --budget (seconds), each writing <out>/<step>.json with the device
and its own time, each one's failure recorded there without stopping the next:
  env           device, versions, FAISS present or not, copy bandwidth, bf16 matmul rate
  kernel_tests  tests/test_kernel.py on the device (fp16/bf16/fp32, D 64/128, tiles, decode, GQA, padding)
  kernel_bench  benchmarks/bench_kernel.py's short sweep: fused vs two-kernel vs reference vs sdpa floor
  store         benchmarks/bench_memory.py: exact search on the GPU (fp32, fp16 keys) at 8K-1M memories
                per head with recall, the machine's CPU beside it at the sizes it can do in time
  train         benchmarks/paper_table.py --preset gpu, then --preset control-gpu: training throughput
                (bf16 autocast, the kernel's backward), the from-scratch table on bytes and the
                known-answer control, each configuration saved as it finishes
  cost          the eval's configurations at the bundled model's shape (random weights: the GGUF file
                cannot travel, see the README), tokens/s of xl, long and xl+memory on one document
The rehearsal runs the same code on a CPU, the kernel in Triton's interpreter, on tiny shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# Seconds of each step on a GPU (their sum is the default --budget); the rehearsal has no budget.
SHARES = {"env": 10, "kernel_tests": 110, "kernel_bench": 75, "store": 45, "train": 180, "cost": 60}


def remaining(deadline: float) -> float | None:
    """Seconds a child process may run: until the deadline (at least 10), or None (no limit)."""
    return None if deadline == float("inf") else max(10.0, deadline - time.monotonic())


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def step_env(args, deadline: float) -> dict:
    import torch

    from bench_kernel import copy_bandwidth
    from common import machine_info

    # machine_info: platform, Python, torch, transformers, triton, FAISS (None if absent), device
    result = {"machine": machine_info(), "cuda": torch.version.cuda}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result["copy_bandwidth_GBps"] = copy_bandwidth(device)
    if device == "cuda":
        from triton.testing import do_bench

        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        result["bf16_matmul_TFLOPs"] = 2 * n**3 / (do_bench(lambda: a @ b) * 1e-3) / 1e12
        result["multiprocessors"] = torch.cuda.get_device_properties(0).multi_processor_count
    return result


def run_child(command: list[str], deadline: float) -> tuple[int | None, str]:
    """(return code, output) of `command` run in the repository until `deadline`; return code
    None if it was stopped there (its output so far is kept)."""
    timeout = remaining(deadline)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        return None, f"stopped at the time budget ({timeout:.0f} s)\n" + (err.stdout or b"").decode(errors="replace")


def step_kernel_tests(args, deadline: float) -> dict:
    """pytest over tests/test_kernel.py in a child process (the rehearsal: a few cases)."""
    junit = os.path.join(args.out, "kernel_tests.xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "test_kernel.py"),
               f"--junitxml={junit}"]
    if args.rehearse:
        command += ["-k", "memory_branch_alone or all_memory_empty or errors_are_clear"]
    returncode, output = run_child(command, deadline)
    counts = {}
    if os.path.exists(junit):
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        os.remove(junit)
    return {"returncode": returncode, "passed": returncode == 0, **counts, "output_tail": output[-4000:]}


def step_kernel_bench(args, deadline: float) -> dict:
    import torch

    from bench_kernel import GRIDS, sweep

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = sweep(GRIDS["tiny" if args.rehearse else "short"], device, deadline)
    if device == "cuda" and result["results"]:
        from bench_kernel import plot

        plot(result["results"], os.path.join(args.out, "kernel_bench.png"))
    return result


def step_store(args, deadline: float) -> dict:
    import torch

    import bench_memory

    from knnmem.eval.report import faiss_version

    gpu = torch.cuda.is_available()
    sizes = [1024, 4096] if args.rehearse else [8192, 65536, 262144, 1048576]
    candidates = (["exact@cuda", "exact@cuda/float16"] if gpu else ["exact", "exact/float16"])
    options = argparse.Namespace(sizes=sizes, backends=candidates, heads=2 if args.rehearse else 8, peer=False,
                                 dim=64, k=32, queries=64 if args.rehearse else 2048, repeat=2)
    # The machine's own CPU beside the GPU at one size (exact and, with FAISS, flat), same queries.
    cpu = argparse.Namespace(**{**vars(options), "sizes": [sizes[1]],
                                "backends": ["exact"] + (["flat"] if faiss_version() else [])})
    cpu_rows = bench_memory.sweep(cpu) if gpu else []
    rows = bench_memory.sweep(options, deadline)
    return {"parameters": {k: v for k, v in vars(options).items()}, "sweep": rows, "cpu_beside": cpu_rows}


def step_train(args, deadline: float) -> dict:
    """paper_table.py in a child process per preset (the paper's rows on bytes, then the control
    corpus): each saves its JSON after every configuration, so a preset stopped at the deadline
    keeps what it finished."""
    result = {}
    for preset in (["rehearse"] if args.rehearse else ["gpu", "control-gpu"]):
        out = os.path.join(args.out, f"train_{preset}.json")
        command = [sys.executable, os.path.join(HERE, "paper_table.py"), "--preset", preset, "--out", out, "--no-plot"]
        returncode, output = run_child(command, deadline)
        table = None
        if os.path.exists(out):
            with open(out) as f:
                table = json.load(f)
            os.remove(out)  # folded into train.json: the results folder keeps few files
        result[preset] = {"returncode": returncode, "output_tail": output[-3000:], "table": table}
        if time.monotonic() > deadline:
            break
    return result


def step_cost(args, deadline: float) -> dict:
    """Tokens/s of the eval's configurations at SmolLM2-135M's shape with random weights (what
    memory costs on a GPU; perplexities of random weights mean nothing and are not reported)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from knnmem.patch import saved_settings
    from knnmem.eval.model import BUNDLED_CALIBRATION
    from knnmem.eval.perplexity import PerplexityRun, evaluate_perplexity

    gpu = torch.cuda.is_available()
    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                 tie_word_embeddings=True)
    if args.rehearse:
        shape.update(hidden_size=144, intermediate_size=128, num_hidden_layers=2, vocab_size=512)  # 9 heads of 16
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to("cuda" if gpu else "cpu",
                                                      torch.bfloat16 if gpu else torch.float32).eval()
    tokens = 1024 if args.rehearse else 16384
    ids = torch.randint(shape["vocab_size"], (tokens,), generator=torch.Generator().manual_seed(0))
    heads = None if args.rehearse else saved_settings(BUNDLED_CALIBRATION)["heads"]
    run = PerplexityRun(configs=("xl", "long", "xl+memory"), segment=128 if args.rehearse else 512,
                        window=512 if args.rehearse else 8192, max_tokens=tokens,
                        patch_options={"heads": heads})
    result = evaluate_perplexity(model, "random weights, SmolLM2-135M's shape" if not args.rehearse else "tiny",
                                 [("random.txt", ids)], run)
    configs = {name: {"tokens_per_s": c["tokens_per_s"], "seconds": c["seconds"], "memory": c["memory"]}
               for name, c in result["configs"].items()}
    xl = configs.get("xl", {}).get("tokens_per_s")
    for c in configs.values():
        c["time_vs_xl"] = xl / c["tokens_per_s"] if xl else None
    return {"shape": shape, "dtype": "bfloat16" if gpu else "float32", "tokens": tokens,
            "heads_with_memory": len(heads) if heads else "all", "configs": configs,
            "real_model": "not run: the bundled GGUF (98 MB) exceeds the 64 MiB that travels and the GPU machine "
                          "has no gguf; see the README's GPU section"}


STEPS = {"env": step_env, "kernel_tests": step_kernel_tests, "kernel_bench": step_kernel_bench,
         "store": step_store, "train": step_train, "cost": step_cost}


def deadlines(steps: list[str], budget: float, start: float) -> dict[str, float]:
    """When each chosen step must stop: `budget` shared by the steps that run, in SHARES' ratios;
    time a step leaves unused carries over to the next."""
    chosen = [s for s in STEPS if s in steps]  # in the suite's order
    scale = budget / sum(SHARES[s] for s in chosen)
    return {name: start + scale * sum(SHARES[s] for s in chosen[:i + 1]) for i, name in enumerate(chosen)}


def write(path: str, payload: dict) -> None:
    """Atomic: a rerun or a stop mid-write never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/gpu, or "
                                               "/tmp/knnmem_rehearsal with --rehearse)")
    p.add_argument("--budget", type=float, default=sum(SHARES.values()),
                   help="seconds for the steps that run, shared as SHARES says (default %(default)s)")
    p.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS), help="steps to run, in order")
    p.add_argument("--rehearse", action="store_true", help="every step on tiny shapes, on a CPU")
    args = p.parse_args()
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        p.error("no CUDA device: run the suite on a GPU, or --rehearse it on this CPU")
    if args.rehearse:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before knnmem.kernels is first imported
    args.out = args.out or ("/tmp/knnmem_rehearsal" if args.rehearse else os.path.join(HERE, "results", "gpu"))
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    stops = deadlines(args.steps, args.budget, start)
    summary = {"device": device_name(), "rehearse": args.rehearse, "budget_s": args.budget, "steps": {}}
    for name in stops:
        step_start = time.monotonic()
        deadline = float("inf") if args.rehearse else stops[name]  # the rehearsal stops nothing at a deadline
        print(f"== {name} (until {deadline - start:.0f} s into the suite)", flush=True)
        try:
            payload, status = STEPS[name](args, deadline), "ok"
        except Exception as err:  # one step's failure is recorded and the suite goes on
            payload, status = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}, "failed"
            print(payload["traceback"], flush=True)
        if name == "kernel_tests" and not payload.get("passed", False) and status == "ok":
            status = "tests failed"
        seconds = time.monotonic() - step_start
        write(os.path.join(args.out, f"{name}.json"),
              {"step": name, "device": summary["device"], "status": status, "seconds": seconds, **payload})
        summary["steps"][name] = {"status": status, "seconds": round(seconds, 1)}
        print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    summary["seconds"] = time.monotonic() - start
    write(os.path.join(args.out, "suite.json"), summary)
    print(json.dumps(summary, indent=1))
    if any(s["status"] != "ok" for s in summary["steps"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
