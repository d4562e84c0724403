"""Runtime settings: device selection, core split, allocator configuration."""

from __future__ import annotations

import platform

import pytest
import torch

from osteoscan.errors import UsageError
from osteoscan.runtime import configure_allocator, cpu_count, plan_cpu, select_device


def test_select_device() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(UsageError):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError):
            select_device("cuda:0")


def test_cpu_plan_never_oversubscribes(monkeypatch) -> None:
    monkeypatch.delenv("OSTEOSCAN_TORCH_THREADS", raising=False)
    cpu = torch.device("cpu")
    default = plan_cpu(cpu, None)
    assert default.workers >= 1
    assert default.workers + default.torch_threads <= max(cpu_count(), 2)
    assert plan_cpu(cpu, 0).torch_threads == cpu_count()
    assert plan_cpu(cpu, 64).torch_threads == 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc only")
def test_allocator_configured_on_glibc() -> None:
    assert configure_allocator() is True
    assert configure_allocator() is True  # idempotent
