"""marfast: fast, faithful MAR (masked autoregressive image generation with Diffusion Loss)."""
from setuptools import setup

setup(
    name="marfast",
    version="0.1.0",
    description="Masked autoregressive image generation with a per-token Diffusion Loss: "
    "faithful to the official MAR, with fused Triton kernels.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["marfast", "marfast.recipes", "marfast.kernels"],
    package_dir={"marfast": "marfast", "marfast.kernels": "kernels"},
    package_data={"marfast": ["weights/*/*"]},
    include_package_data=True,
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "safetensors", "tqdm", "pillow"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "nvidia-ml-py", "scikit-learn", "huggingface_hub"],
        "flash": ["flash-attn>=2.6.3"],
        "hub": ["huggingface_hub"],
    },
    entry_points={"console_scripts": ["marfast=marfast.cli:main"]},
)
