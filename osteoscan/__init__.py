"""osteoscan: batch screening of knee and spine radiographs for low bone density.

Research software, not for clinical use. The package is a library first: every command of the
``osteoscan`` CLI is a thin wrapper over functions importable from here.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
