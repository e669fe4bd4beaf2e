"""knnmem: long-term kNN memory for transformers, as in Memorizing Transformers (Wu et al., 2022)."""
from .layer import CausalAttention, KNNAttention
from .knowledge import KnowledgeMemory, Storage
from .memory import KNNMemory
from .models import MemorizingConfig, MemorizingTransformer
from .handle import MemoryHandle
from .patch import load_patch, memory_parameters, patch, save_patch, unpatch
from .train.trainable import load_trained

__all__ = ["CausalAttention", "KNNAttention", "KNNMemory", "KnowledgeMemory", "MemorizingConfig", "MemorizingTransformer",
           "MemoryHandle", "Storage", "load_patch", "load_trained", "memory_parameters", "patch", "save_patch", "unpatch"]
__version__ = "0.1.0"
