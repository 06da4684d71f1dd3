"""Install ecgtok: `pip install -e .` locally, and `--setup_file ./setup.py` on Dataflow.

The repository keeps the layout the project was asked for (`pipeline/`, `transforms/`,
`models/` at the top), and installs them under one namespace, `ecgtok.*`, so that
generic names such as `models` never clash with a user's own modules.
"""

from pathlib import Path

from setuptools import setup

PACKAGES = {
    "ecgtok.pipeline": "pipeline",
    "ecgtok.transforms": "transforms",
    "ecgtok.transforms.formats": "transforms/formats",
    "ecgtok.models": "models",
}

setup(
    name="ecgtok",
    version="0.1.0",
    description="ECG archives to heartbeat-token Parquet shards and batched torch scores, on Apache Beam",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"ecgtok.models": ["artifacts/*/*", "artifacts/*/*/*"]},
    include_package_data=True,
    install_requires=[
        # Exact pin: a looser torch requirement pulls a multi-GB CUDA build.
        "torch==2.13.0",
        "apache-beam[gcp]>=2.77.0,<2.78",
        # Beam 2.77 caps these two.
        "pyarrow>=14,<26",
        "numpy>=1.24,<2.5",
        "scipy>=1.11",
        "wfdb>=4.1",
        "pandas>=2.0",
        "safetensors>=0.4",
        "scikit-learn>=1.3",
        # Hospital exports: DICOM waveforms, and XML parsed without entity expansion.
        "pydicom>=3.0,<4",
        "defusedxml>=0.7.1,<1",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "hypothesis>=6",
            "matplotlib>=3.7",
            "neurokit2>=0.2.10",
            "gcp-storage-emulator>=2024.8.3",
            "sierraecg>=0.4,<0.5",
            "duckdb>=1.0",
        ],
    },
    entry_points={"console_scripts": ["ecgtok=ecgtok.pipeline.cli:entry"]},
)
