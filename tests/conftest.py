"""Shared test fixtures (keep small; add yours below with a one-line docstring)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pydicom_data() -> Callable[[str], Path]:
    """``pydicom_data("RG3_UNCR")`` → path of a ``pydicom-data`` / pydicom test file, else skip."""

    def get(name: str) -> Path:
        from pydicom.data import get_testdata_file

        for candidate in (name, f"{name}.dcm"):
            try:
                found = get_testdata_file(candidate, download=False)
            except Exception:  # noqa: BLE001 - a missing optional data package means skip
                found = None
            if found:
                return Path(found)
        pytest.skip(f"test file {name} not installed (pip install pydicom-data)")

    return get


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_package(name="tiny-knee", body_parts=("knee",), members=2, size=64)`` → package dir.

    A real model package (B1 format) of seeded ``tiny_cnn`` members, built once per argument set.
    Classes normal/osteopenia/osteoporosis, positives osteopenia+osteoporosis, threshold 0.5.
    """
    cache: dict[tuple, Path] = {}

    def build(
        name: str = "tiny-knee",
        body_parts: tuple[str, ...] = ("knee",),
        members: int = 2,
        size: int = 64,
        classes: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis"),
        threshold: float = 0.5,
        seed: int = 0,
    ) -> Path:
        key = (name, tuple(body_parts), members, size, tuple(classes), threshold, seed)
        if key in cache:
            return cache[key]
        from osteoscan.testing.packages import tiny_package

        out = tmp_path_factory.mktemp("pkg") / name
        cache[key] = tiny_package(
            out, name=name, body_parts=body_parts, members=members, size=size,
            classes=classes, threshold=threshold, seed=seed,
        )  # fmt: skip
        return cache[key]

    return build


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr+stdout of the real entry point (exceptions mapped to exit codes)."""
    from osteoscan.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.err + out.out
