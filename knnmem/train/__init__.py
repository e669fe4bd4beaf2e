"""Training with memory: fine-tuning a retrofit (`knnmem train`), training from scratch, and
memorising documents into a `ResidualMemory` (`train_adapter`)."""
from ..corpus import pieces
from .adapter import train_adapter
from .loop import TrainSettings, perplexity, token_losses, train
from .retrofit import default_layers
from .trainable import TRAINABLE, load_trained, prepare

__all__ = ["TRAINABLE", "TrainSettings", "default_layers", "load_trained", "perplexity", "pieces", "token_losses", "prepare", "train", "train_adapter"]
