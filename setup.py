"""modelzoo-sparse-lora: sparsity-preserving LoRA for pruned LLMs on Cerebras ModelZoo and GPUs.

Install editable (`pip install -e .`): on a Cerebras cluster the appliance mounts editable
packages onto the workers, and ModelZoo itself only supports editable installs.
"""

from setuptools import find_packages, setup

# Ranges include the pins of every supported ModelZoo release (2.6 to 2.10: torch 2.4.0,
# transformers 4.45.2 / 4.57.1, tokenizers 0.20.1 / 0.22.1, datasets 2.19.1 / 3.6.0, lm-eval 0.4.7 /
# 0.4.9.1, pydantic 2.8.2, h5py 3.13.0, safetensors 0.4.5) and current releases, so that adding this
# package to a release's environment changes nothing installed (scripts/install_into_env.py checks
# it). Floors are the oldest release's versions, on which the tests pass.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "numpy>=1.25",
    "transformers>=4.45.2",
    "tokenizers>=0.20",
    # converts the bundled SentencePiece tokenizers (Mistral) to fast tokenizers
    "sentencepiece>=0.2",
    "protobuf>=3.20",
    "safetensors>=0.4.5",
    # mask files checksum source weights and masks with BLAKE3 (docs/masks.md: "Checksums")
    "blake3>=0.4",
    "h5py>=3.10",
    "pydantic>=2.8.2,<3",
    "pyyaml>=6",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "peft>=0.13",
    "datasets>=2.19.1",
    # 0.4.7 (ModelZoo 2.6, 2.7) to 0.4.9.1 (2.8 to 2.10): the versions `sparse-lora eval` is tested with
    "lm-eval>=0.4.7,<=0.4.9.1",
    "accelerate>=0.34",
    "gguf>=0.10",
    # the reference trainer's curves, under a ModelZoo run's tags (gpu_reference.tensorboard); a
    # ModelZoo environment has it already (cerebras-pytorch pins 2.17.1)
    "tensorboard>=2.14",
]

EXTRAS_REQUIRE = {
    # The ModelZoo 2.10 stack (cp311 wheels only): cerebras-pytorch pins torch 2.4.0 and numpy
    # 1.25.0; the rest are ModelZoo's own pins, so the package is tested on what `cszoo` runs with
    # (pyarrow: the newest refuses numpy 1.25, which breaks `datasets` and lm-eval).
    "cs": [
        "cerebras-pytorch==2.10.0",
        "numpy==1.25.0",
        "transformers==4.57.1",
        "tokenizers==0.22.1",
        "sentencepiece==0.2.1",  # 0.2.3 needs a protobuf newer than cerebras' 4.21.12
        "datasets==3.6.0",
        "lm-eval==0.4.9.1",
        "pydantic==2.8.2",
        "h5py==3.13.0",
        "safetensors==0.4.5",
        "pyarrow==17.0.0",
        "tensorboard==2.17.1",
    ],
    # import-linter 2.17 needs click>=8.2; ModelZoo 2.6-2.8 pin click 8.1.7, where 2.16 is taken.
    "dev": ["pytest>=8", "hypothesis>=6.100", "ruff==0.8.4", "import-linter>=2.16,<2.18"],
}

setup(
    name="modelzoo-sparse-lora",
    version="0.1.0",
    description="Sparse-to-dense and sparse-to-sparse LoRA for pruned LLMs on Cerebras ModelZoo and GPUs",
    python_requires=">=3.11",
    packages=find_packages(include=["modelzoo_ext*", "mask_converters*", "gpu_reference*"]),
    package_data={"modelzoo_ext.study": ["examples/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "sparse-lora = modelzoo_ext.cli:main",
            # `cszoo` with this package's ModelZoo registrations, for sites that forbid .pth files.
            "cszoo-sparse-lora = modelzoo_ext.cerebras.wrapper:main",
        ]
    },
)
