"""Training with memory: fine-tuning a retrofit (`knnmem train`) and training from scratch."""
from .loop import TrainSettings, perplexity, pieces, train
from .trainable import TRAINABLE, load_trained, prepare

__all__ = ["TRAINABLE", "TrainSettings", "load_trained", "perplexity", "pieces", "prepare", "train"]
