"""doge-dist: a Megatron/DeepSpeed-style distributed trainer for Doge small language models."""

__version__ = "0.1.0"
