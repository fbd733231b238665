"""Peak memory of one training case, measured in the fresh process that runs it.

CPU: resident-set growth. The process builds the case, frees what building left behind, notes
its resident size (VmRSS), resets the kernel's high-water mark (writing 5 to
/proc/self/clear_refs), runs three training steps, and reads the mark (VmHWM). The growth
counts everything a step adds: activations kept for backward, gradients, optimizer state,
workspace, and what the C allocator keeps after frees (temporaries fragment its heap). With
MALLOC_MMAP_THRESHOLD_=65536 set by the parent ("live" figures) every large tensor is its own
mapping, returned on free, and the resident set follows the live tensors alone.

CUDA: torch.cuda.max_memory_allocated() over the same three steps, less what was allocated
before them.
"""

from __future__ import annotations

import gc

import torch

import cases as C

STEPS = 3


def measure(setting_name: str, case: str, device: str, dtype: torch.dtype) -> dict[str, float]:
    setting = C.find_setting(setting_name)
    step = C.build_training(setting, device, dtype, only=case)[case]
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20}
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(STEPS):
        step()
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
