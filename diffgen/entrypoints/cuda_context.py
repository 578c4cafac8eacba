"""The GPU's CUDA context created in a background thread while a one-shot ``generate`` is still importing torch and
diffgen. Creating it took ~1.2 s of a one-shot FLUX.1-dev process on an H100, paid inside the first weight read
(docs/benchmarks.md); here it overlaps the ~3.8 s of imports instead.

Through the CUDA driver API by ctypes (``cuInit``, ``cuDeviceGet``, ``cuDevicePrimaryCtxRetain``): ctypes releases
the GIL during each call, so the main thread's imports go on meanwhile, and nothing needs torch yet. PyTorch's
runtime then finds the device's primary context already there and uses it (the runtime API always uses the
primary context). Only for a generate that runs in this one process on one GPU: a multi-GPU run's rank processes
are started with "spawn" (no fork inherits a context) and pick their own devices, and each torchrun rank uses the
device of its local rank, so neither would gain from a context made here on the default device.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from typing import Any

from diffgen.options import parallel_option_names  # neither imports torch
from diffgen.parallel.launch import under_torchrun

#: "0": no early context (the first CUDA call makes it, as without this module)
EARLY_CUDA_CONTEXT_ENV = "DIFFGEN_EARLY_CUDA_CONTEXT"


def device_ordinal(options: dict[str, Any]) -> int | None:
    """The CUDA device a one-process ``generate`` with these options will run on, or None: CPU, several GPUs, a
    torchrun rank, or the switch at 0. ``--device`` unset or ``auto`` means GPU 0 where there is one."""
    # Mirrors what Engine.from_pretrained decides with torch at hand (engine.py: several GPUs when plan.num_gpus > 1;
    # parse_device's "auto"): keep the two in step, or a multi-GPU run's parent holds a context on GPU 0.
    if os.environ.get(EARLY_CUDA_CONTEXT_ENV, "1") == "0":
        return None
    if under_torchrun():
        return None
    # each parallel option means one GPU at its default (1 / False)
    if any(options.get(name) is True or (type(options.get(name)) is int and options[name] > 1)
           for name in parallel_option_names()):
        return None
    device = options.get("device") or "auto"
    if device in ("auto", "cuda"):
        return 0
    match = re.fullmatch(r"cuda:(\d+)", device)
    return int(match.group(1)) if match else None


def start(options: dict[str, Any]) -> threading.Thread | None:
    """Start creating the context of the device these options run on, in a daemon thread (None: nothing to do).
    Nothing happens on a machine without a CUDA driver or device; any failure is left for torch to report."""
    ordinal = device_ordinal(options)
    if ordinal is None:
        return None
    thread = threading.Thread(target=retain_primary_context, args=(ordinal,), name="diffgen-cuda-context",
                              daemon=True)
    thread.start()
    return thread


def retain_primary_context(ordinal: int) -> bool:
    """Create (retain) the primary context of CUDA device ``ordinal``; False where there is no driver or device.
    The context is never released: the process's torch uses it until the process ends."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    device, context = ctypes.c_int(), ctypes.c_void_p()
    return (driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(device), ordinal) == 0
            and driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) == 0)
