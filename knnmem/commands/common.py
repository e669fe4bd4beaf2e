"""What the commands share: option parsing and checks (exiting through the parser with the
option's name), and the start of a command (torchrun process group, model loading)."""
from __future__ import annotations

import argparse
import math
import os
import tempfile

import torch

from ..eval.model import BUNDLED_CALIBRATION, load_model
from ..patch import saved_settings


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The commands' --help: the description as written, and every option's default."""


def parse_layers(text: str) -> list[int] | None:
    """"all", or a comma list of indices and ascending ranges: "22", "15-29", "0,10-12"."""
    if text == "all":
        return None
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or not (hi.isdigit() or hi == ""):
            raise ValueError(f'--layers must be "all" or indices and ranges such as "22", "15-29", "0,10-12"; got {text!r}')
        if hi and int(hi) < int(lo):
            raise ValueError(f"--layers range {part!r} is empty (write the lower index first)")
        layers += list(range(int(lo), int(hi or lo) + 1))
    return layers


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and inf are refused with the option's name)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_writable(path: str) -> None:
    """OSError unless a file can be written at `path` (its folder is created if missing)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a file")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory):
        pass


def check_positive(parser: argparse.ArgumentParser, args, *names: str) -> None:
    """Each option `names` (attribute names of `args`) must be a positive integer."""
    for name in names:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")


def check_non_negative(parser: argparse.ArgumentParser, args, *names: str) -> None:
    """Each option `names` that is given (not None) must be >= 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def check_results_writable(parser: argparse.ArgumentParser, paths: list[str]) -> None:
    for path in paths:
        try:
            check_writable(path)
        except OSError as err:
            parser.error(f"cannot write results to {path!r}: {err}")


def check_layers(parser: argparse.ArgumentParser, option: str | None, layers: list[int] | None, model) -> None:
    """`layers` (None: all) must be layers of `model`; `option` is the --layers text given."""
    n_layers = model.config.num_hidden_layers
    if layers is not None and not all(0 <= i < n_layers for i in layers):
        parser.error(f"--layers {option!r}: this model has layers 0..{n_layers - 1}")


def load_or_exit(parser: argparse.ArgumentParser, model: str | None, device: str):
    """`load_model`; a bad --model exits through `parser`. Returns (model, tokenizer, description)."""
    try:
        return load_model(model, device=device)
    except (OSError, ValueError) as err:
        parser.error(f"--model: {err}")


def start_command(parser: argparse.ArgumentParser, model: str | None, device: str):
    """What `knnmem eval` and `knnmem train` do first: join the process group when launched by
    torchrun (one CPU share per process), then load the model (a bad --model exits through
    `parser`). Returns (model, tokenizer, description, world size, rank)."""
    import torch.distributed as dist

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    lm, tokenizer, description = load_or_exit(parser, model, device)
    return lm, tokenizer, description, world, rank


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def memory_heads(parser: argparse.ArgumentParser, option: str, model: str | None) -> list[list[int]] | None:
    """--heads: "all" (None: every head), "calibrated" (the committed calibration of the bundled
    model; every head for another --model) or a `knnmem calibrate` output directory."""
    if option == "all" or (option == "calibrated" and model is not None):
        return None
    directory = BUNDLED_CALIBRATION if option == "calibrated" else option
    try:
        return saved_settings(directory).get("heads")
    except ValueError as err:
        parser.error(f"--heads {option!r}: {err}")
