"""knnmem: long-term kNN memory for transformers, as in Memorizing Transformers (Wu et al., 2022)."""
from .layer import KNNAttention
from .memory import KNNMemory
from .patch import MemoryHandle, load_patch, memory_parameters, patch, save_patch, unpatch

__all__ = ["KNNAttention", "KNNMemory", "MemoryHandle", "load_patch", "memory_parameters", "patch", "save_patch",
           "unpatch"]
__version__ = "0.1.0"
