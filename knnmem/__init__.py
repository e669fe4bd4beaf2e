"""knnmem: long-term kNN memory for transformers, as in Memorizing Transformers (Wu et al., 2022)."""
from .layer import KNNAttention
from .memory import KNNMemory

__all__ = ["KNNAttention", "KNNMemory"]
__version__ = "0.1.0"
