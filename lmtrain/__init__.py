"""lmtrain: Transformer language-model pretraining and fine-tuning on Lightning + Hydra."""

__version__ = "0.1.0"
