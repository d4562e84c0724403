"""The package list; everything else about the build is in pyproject.toml.

The model packages stay in the repository's top-level ``models/`` folder and are installed as
``osteoscan._models`` (found by ``osteoscan.manifest.bundled_models_dir``), so ``pip install .``
ships the default model. pyproject.toml cannot combine package discovery with a package mapped
from another folder, hence these lines.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["osteoscan", "osteoscan.*"]), "osteoscan._models"],
    package_dir={"osteoscan._models": "models"},
)
