"""siasam-fast: fast SiaSamRea (Siamese Sampling and Reasoning, NeurIPS 2021) training on GPUs."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

# DALI is published per CUDA major version; pick the extra that matches the driver's CUDA:
#   gpu       -> nvidia-dali-cuda130 (CUDA 13 drivers: H100/A100 with current wheels of torch)
#   gpu-cu120 -> nvidia-dali-cuda120 (CUDA 12 drivers, including the V100 stack in the README)
# The CPU test suite uses the cuda130 wheel: it imports without a GPU and runs its CPU decoders.
DALI_CU130 = "nvidia-dali-cuda130>=2.0"
DALI_CU120 = "nvidia-dali-cuda120>=2.0"

setup(
    name="siasam-fast",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level `kernels/` folder is installed as `siasam_kernels`: PyPI's `kernels` package
    # (which transformers probes for) owns the bare name. `configs/` (run and DeepSpeed configs)
    # is installed as siasam_fast/configs/, where a wheel's `--config configs/...` finds it
    # (siasam_fast.paths.shipped_config) and the demo its configs/demo.yaml.
    packages=["siasam_fast", "siasam_fast.pipeline", "siasam_fast.data", "siasam_kernels",
              "siasam_fast.configs"],
    package_dir={"siasam_kernels": "kernels", "siasam_fast.configs": "configs"},
    package_data={"siasam_fast": ["assets/*", "assets/**/*"], "siasam_kernels": ["tuned.json"],
                  "siasam_fast.configs": ["*.yaml", "ds/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.45",
        "deepspeed>=0.16",
        "numpy>=1.24",
        "av>=12",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6"],
        "gpu": [DALI_CU130],
        "gpu-cu120": [DALI_CU120],
    },
    entry_points={"console_scripts": ["siasam-fast=siasam_fast.cli:main"]},
)
