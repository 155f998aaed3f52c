"""dpo_ds: DeepSpeed-native Direct Preference Optimization.

The C++/CUDA log-prob kernels in csrc/ are compiled on first use (see
dpo_ds/ops); installation never needs a compiler.
"""
from setuptools import find_namespace_packages, setup

setup(
    name="dpo_ds",
    version="0.1.0",
    description="DeepSpeed-native DPO trainer and its loss family",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["dpo_ds", "dpo_ds.*"]),  # data folders too
    package_data={"dpo_ds": ["builtin/*.jsonl", "templates/*.jinja", "ds_configs/*.json"]},
    include_package_data=True,
    install_requires=[
        # A range that the CPU build 2.13.0 satisfies: a GPU cluster keeps its own CUDA torch.
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.56",
        "datasets>=3.0",
        "peft>=0.13",
        "safetensors",
        "gguf>=0.10",
        "pyyaml",
        "tqdm",
        "numpy",
        "ninja",
        "matplotlib",  # dpo-ds sweep's plot
        "pillow",  # images of vision-language preference data
        "xxhash",  # checkpoint checksums in COMPLETE
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "trl==1.16.0", "tensorboard", "mpi4py", "triton"],
        "mpi": ["mpi4py"],
        "gpu": ["flash-attn", "liger-kernel", "triton"],
    },
    entry_points={"console_scripts": ["dpo-ds=dpo_ds.cli:main"]},
)
