"""Build and install dualpipe, overlap and the Triton kernels (as ``overlap.kernels``).

Install without build isolation so the installed torch is used::

    pip install --no-build-isolation -e .
"""
from setuptools import setup

setup(
    name="dualpipe-overlap",
    version="0.1.0",
    description="Bidirectional pipeline parallelism (DualPipe/DualPipeV) with "
                "computation/communication overlap primitives",
    python_requires=">=3.10",
    packages=["dualpipe", "overlap", "overlap.kernels"],
    package_dir={"overlap.kernels": "kernels"},
    install_requires=["numpy"],
    extras_require={
        "draw": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["dualpipe=dualpipe.__main__:main"]},
)
