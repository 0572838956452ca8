"""Package set-up. The Triton kernels live in the top-level folder kernels/ and install as
convcov_fast.kernels, so no top-level module named kernels is installed."""

from setuptools import setup

setup(
    name="convcov_fast",
    version="0.1.0",
    description=(
        "Covariance-based initialization of depthwise convolution filters and fast "
        "large-kernel depthwise convolution for frozen filters"
    ),
    python_requires=">=3.9",
    packages=["convcov_fast", "convcov_fast.kernels"],
    package_dir={"convcov_fast": "convcov_fast", "convcov_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "matplotlib", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
    entry_points={"console_scripts": ["convcov-fast = convcov_fast.cli:main"]},
)
