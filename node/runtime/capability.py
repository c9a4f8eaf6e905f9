"""Detect what this machine brings (torch for CUDA devices, psutil for CPU/RAM/disk) and measure it.

The micro-benchmark times square matmuls for a fixed time budget and reports the best rate on the device the
node trains on (node/runtime/device.py; GPU 0 under the default ``auto`` when there is one): fp32 always, and bf16
on a GPU that computes it natively. The record also names that device and its free memory (refresh_free updates
it at each heartbeat).
"""

from __future__ import annotations

import dataclasses
import pathlib
import platform
import time

import psutil
import torch

from node.runtime.device import device_label, memory_of, precision_refusal, resolve_device
from protocol.records.peer import Capability, GpuInfo


def matmul_tflops(device: str, dtype: torch.dtype, n: int, budget_s: float) -> float:
    """Best observed TFLOPS of an (n, n) @ (n, n) matmul within ``budget_s`` seconds (2 n^3 flops each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)  # warm-up: kernels, allocator, thread pool
    sync()
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    iters = 0
    while iters < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
        iters += 1
    return 2 * n**3 / best / 1e12


def detect_gpus() -> tuple[GpuInfo, ...]:
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(GpuInfo(props.name[:128], int(props.total_memory), (props.major, props.minor)))
    return tuple(gpus)


def detect(home: pathlib.Path, benchmark_seconds: float = 0.3, device: torch.device | None = None) -> Capability:
    """The capability of this machine training on ``device`` (default: resolve_device("auto"))."""
    gpus = detect_gpus()
    home = pathlib.Path(home).expanduser()
    device = resolve_device("auto") if device is None else device
    label = device_label(device)
    if device.type == "cuda":
        # TF32 would report tensor-core rates as "fp32"; measure true fp32.
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = matmul_tflops(label, torch.float32, 4096, benchmark_seconds / 2)
        bf16 = (matmul_tflops(label, torch.bfloat16, 4096, benchmark_seconds / 2)
                if not precision_refusal(device, "bf16") else None)
    else:
        fp32, bf16 = matmul_tflops("cpu", torch.float32, 512, benchmark_seconds), None
    return Capability(
        gpus=gpus,
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        ram_bytes=psutil.virtual_memory().total,
        disk_free_bytes=psutil.disk_usage(str(home if home.exists() else home.parent)).free,
        tflops_fp32=round(fp32, 4),
        tflops_bf16=None if bf16 is None else round(bf16, 4),
        platform=f"{platform.system()}-{platform.machine()} / torch {torch.__version__}"[:128],
        train_device=label,
        device_free_bytes=memory_of(device)[0],
    )


def refresh_free(cap: Capability, device: torch.device) -> Capability:
    """``cap`` with the free memory of ``device`` measured now (what the node publishes at each heartbeat)."""
    return dataclasses.replace(cap, device_free_bytes=memory_of(device)[0])
