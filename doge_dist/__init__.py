"""doge-dist: a Megatron/DeepSpeed-style distributed trainer for Doge small language models."""
import warnings

# megatron.core warns on import that Transformer Engine/Apex are absent; we use neither's
# fused kernels. Filtered here, in the package every launch/ and data_tools/ entry point imports first.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

__version__ = "0.1.0"
