"""The device a node trains on, its memory, and the mixed precision it can run (torch.amp public APIs only).

    device = resolve_device("auto")              # torch.device("cuda", 0) when torch sees a GPU, else cpu
    free, total = memory_of(device)              # bytes: torch.cuda.mem_get_info, or psutil's RAM figures
    reason = precision_refusal(device, "bf16")   # "" when the device runs it, else why not (one line)
    with autocast(device, "bf16"):               # torch.autocast with the precision's dtype (fp32: a no-op)
        loss = bundle.loss(module, batch)
    scaler = grad_scaler(device, "fp16")         # torch.amp.GradScaler for fp16, None otherwise
    apply_compute_limits(device, 4, 0.5)         # torch threads per job; a CUDA device's memory share (the daemon)

Device names: ``auto`` (the first CUDA device when torch sees one, else the CPU), ``cpu``, ``cuda`` (the current
CUDA device, normally 0) and ``cuda:N``. A name torch cannot serve is a one-line ValueError.

Precisions (a job's ``precision`` field, protocol/records/job_spec.py):
  * fp32: no autocast; every device runs it.
  * bf16: autocast to torch.bfloat16. CUDA: refused unless the device computes bf16 natively
    (torch.cuda.is_bf16_supported(including_emulation=False): compute capability 8.0+); emulated bf16 is slower
    than fp32 and not offered. CPU: torch 2.13's CPU autocast lists bfloat16 (torch.amp.is_autocast_available("cpu")
    and torch.autocast("cpu", dtype=torch.bfloat16)); it is correct on every x86/ARM CPU, and fast only where the
    CPU has bf16 instructions (AVX512-BF16, AMX), so it is accepted and the node's measured step time says the rest.
  * fp16: autocast to torch.float16 with a gradient scaler (torch.amp.GradScaler) so that small gradients do not
    underflow. CUDA: every device. CPU: torch 2.13's CPU autocast also takes float16, and GradScaler("cpu") exists,
    so it is accepted there too (slow on CPUs without AVX512-FP16/AMX-FP16).

Whatever the precision, parameters stay float32 (autocast casts per op), so the parameter vector a node hands to
the federated round and the pipeline's wire stays float32 numpy on the CPU (node/ml/models.py flatten_params).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import psutil
import torch

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "fp16": 2}
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?")  # node/runtime/config.py checks the same form


def check_device_name(name: str) -> str:
    """``name`` if it has the form of a device name (auto, cpu, cuda, cuda:N); else a one-line ValueError."""
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r:.40}")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """The torch.device ``name`` means on this machine; ValueError (one line) for a malformed name or a CUDA device
    torch does not see."""
    check_device_name(name)
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    if name == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not count:
        raise ValueError(f"device {name}: torch sees no CUDA device (torch {torch.__version__}); use --device cpu "
                         "or auto")
    index = int(name.partition(":")[2] or torch.cuda.current_device())
    if index >= count:
        raise ValueError(f"device {name}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def device_label(device: torch.device) -> str:
    """``cpu`` or ``cuda:N``: how the capability record and the CLI name a device."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return device.type


def memory_of(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of ``device``'s memory: torch.cuda.mem_get_info for a GPU (what the CUDA driver reports
    free, other processes included), psutil's available and total RAM for the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    mem = psutil.virtual_memory()
    return int(mem.available), int(mem.total)


def memory_shortfall(device: torch.device, on_device: int, on_host: int) -> str:
    """"" when ``device`` has ``on_device`` bytes free and host RAM ``on_host`` more (on the CPU both come out of
    RAM), else a one-line reason naming the memory that is short."""
    gib = 2**30
    ram = int(psutil.virtual_memory().available)
    if device.type == "cpu":
        need = on_device + on_host
        return "" if need <= ram else f"training needs about {need / gib:.1f} GiB of RAM, {ram / gib:.1f} GiB available"
    free = memory_of(device)[0]
    if on_device > free:
        return f"training needs about {on_device / gib:.1f} GiB on {device_label(device)}, {free / gib:.1f} GiB free"
    if on_host > ram:
        return f"the round's vectors need about {on_host / gib:.1f} GiB of RAM, {ram / gib:.1f} GiB available"
    return ""


def apply_compute_limits(device: torch.device, cpu_threads: int, gpu_memory_fraction: float) -> list[str]:
    """Bound what this process's training may take of the machine (the daemon calls it once, at start): torch's
    intra-op threads (process-wide, so each job's local steps and stage compute run their ops on at most
    ``cpu_threads``; 0 leaves torch's default) and, on a CUDA device, the share of its memory torch's caching
    allocator may hold (torch.cuda.set_per_process_memory_fraction; 0 leaves it all). The lines say what was set."""
    done = []
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
        done.append(f"{cpu_threads} torch thread(s) per job")
    if gpu_memory_fraction and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction, device)
        done.append(f"{gpu_memory_fraction:g} of {device_label(device)}'s memory")
    return done


def check_precision_name(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r:.40}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes in for ``precision`` (None for fp32: no autocast)."""
    return AUTOCAST_DTYPES[check_precision_name(precision)]


def refusal_for(kind: str, precision: str, bf16_native: bool) -> str:
    """Why a device of type ``kind`` ("cpu", "cuda") cannot train at ``precision`` ("" if it can), given whether
    it computes bf16 natively (only asked of CUDA devices). Pure, so every branch is testable on any machine."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r:.20} (this node runs {', '.join(PRECISIONS)})"
    if precision == "fp32":
        return ""
    if not torch.amp.is_autocast_available(kind):
        return f"torch {torch.__version__} has no autocast on {kind}, so it cannot train in {precision}"
    if kind == "cuda" and precision == "bf16" and not bf16_native:
        return "bf16 needs a GPU that computes it natively (compute capability 8.0+); this one does not"
    return ""


def precision_refusal(device: torch.device, precision: str) -> str:
    """"" when ``device`` can train at ``precision``, else a one-line reason (see the module docstring)."""
    bf16_native = True
    if device.type == "cuda" and precision == "bf16":
        with torch.cuda.device(device):
            bf16_native = torch.cuda.is_bf16_supported(including_emulation=False)
    return refusal_for(device.type, precision, bf16_native)


def precision_decline(device: torch.device, precision: str) -> str:
    """"" when ``device`` can train at ``precision``, else the reason a node declines a job for it."""
    reason = precision_refusal(device, precision)
    return f"{device_label(device)} cannot train in {precision}: {reason}" if reason else ""


def check_precision(device: torch.device, precision: str) -> None:
    """ValueError with precision_refusal's reason when ``device`` cannot train at ``precision``."""
    reason = precision_refusal(device, precision)
    if reason:
        raise ValueError(f"{device_label(device)}: {reason}")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """torch.autocast on ``device`` in ``precision``'s dtype; fp32 runs without autocast."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A torch.amp.GradScaler for fp16 on ``device`` (scaled loss; a step with an inf/NaN gradient is skipped and
    the scale halves), None for fp32 and bf16 (bf16 has fp32's exponent range: nothing underflows)."""
    if check_precision_name(precision) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def to_device(batch, device: torch.device):
    """A batch (tensor, or tuple/list of tensors) on ``device``; the same objects when already there."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    items = [to_device(b, device) for b in batch]
    return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)  # a NamedTuple (Batch) or not


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA runs asynchronously): call before reading a step's time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["AUTOCAST_DTYPES", "BYTES_PER_VALUE", "PRECISIONS", "autocast", "autocast_dtype", "check_device_name",
           "check_precision", "check_precision_name", "device_label", "grad_scaler", "memory_of", "memory_shortfall",
           "precision_decline", "precision_refusal", "refusal_for", "resolve_device", "synchronize", "to_device"]
