"""knnmem: long-term kNN memory for transformers, as in Memorizing Transformers (Wu et al., 2022)."""
from .layer import KNNAttention
from .memory import KNNMemory
from .patch import MemoryHandle, memory_parameters, patch, unpatch

__all__ = ["KNNAttention", "KNNMemory", "MemoryHandle", "memory_parameters", "patch", "unpatch"]
__version__ = "0.1.0"
