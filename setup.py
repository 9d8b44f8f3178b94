from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="gift-dist",
    version="0.1.0",
    description="GIFT: confidence-guided LoRA fine-tuning of a base model, merged into its instruct sibling, "
    "distributed with DeepSpeed ZeRO-3.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # ds_configs/ lives at the top of the repo (where cluster users look for it) and ships inside the package.
    packages=find_packages(include=["gift_dist", "gift_dist.*"]) + ["gift_dist.ds_configs"],
    package_dir={"gift_dist.ds_configs": "ds_configs"},
    package_data={"gift_dist": ["resources/*"], "gift_dist.ds_configs": ["*.json"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.51",
        "accelerate>=0.26",
        "peft>=0.14",
        "datasets>=3.0",
        "safetensors>=0.4.3",
        "tokenizers>=0.21",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "psutil>=5.9",
    ],
    extras_require={
        # lm-evaluation-harness for `gift-dist eval --lm-eval`; in `test` too, so its integration is tested.
        "eval": ["lm-eval>=0.4.5"],
        "test": ["pytest>=8", "pandas>=2.0", "pyarrow>=15", "lm-eval>=0.4.5"],
        "tensorboard": ["tensorboard>=2.15"],
    },
    entry_points={"console_scripts": ["gift-dist=gift_dist.cli:main"]},
)
