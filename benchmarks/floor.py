"""The bench's arithmetic floor: FLOP counts of a step, timing, and the device's measured
matrix-multiply peak (the fraction of it a step reaches is its distance to the floor)."""

from __future__ import annotations

import logging
import statistics
import time

import torch

log = logging.getLogger("bench")


def count_flops(fn) -> int:
    """The floating-point operations of one fn() call, forward and backward, as
    `torch.utils.flop_counter.FlopCounterMode` counts them: matrix products, convolutions
    and attention (2 per multiply-add; the CPU attention kernels added to torch's table);
    element-wise work is not counted."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    counter = fc.FlopCounterMode(
        display=False,
        custom_mapping={  # the CPU kernels of scaled_dot_product_attention, not in torch's table
            aten._scaled_dot_product_flash_attention_for_cpu: (
                lambda q, k, v, *args, out_val=None, **kw: fc.sdpa_flop_count(q, k, v)
            ),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: (
                lambda g, q, k, v, *args, out_val=None, **kw: fc.sdpa_backward_flop_count(
                    g, q, k, v
                )
            ),
        },
    )
    with counter:
        fn()
    return int(counter.get_total_flops())


def timed(fn, steps: int, device: torch.device, flops: list[int] | None = None) -> float:
    """Median seconds of fn() over `steps` runs after one warm-up run; with `flops`, the
    warm-up run's FLOP count (`count_flops`) is appended to it."""
    if flops is None:
        fn()
    else:
        flops.append(count_flops(fn))
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, sides=(1024, 2048, 4096)) -> float:
    """The device's measured matrix-multiply throughput in FLOP/s: square `dtype` products
    of each side, best of a few timed repeats, the best side taken (2 n^3 FLOPs each)."""
    best = 0.0
    repeats = 1 if device.type == "cpu" else 20  # a GPU product is too short to time alone
    for n in sides:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        t = timed(lambda a=a, b=b: [a @ b for _ in range(repeats)], 3, device) / repeats
        best = max(best, 2 * n**3 / t)
    log.info("%s %s matmul peak: %.1f GFLOP/s", device, dtype, best / 1e9)
    return best


PEAKS: dict[str, float] = {}  # this run's measured matmul peaks (FLOP/s) by dtype name


def peaks(sizes, device: torch.device) -> dict[str, float]:
    """fp32 (and, with bf16 timing on, bf16) matmul peaks, measured once per run."""
    if not PEAKS:
        sides = sizes.peak_sides if device.type == "cpu" else [4 * n for n in sizes.peak_sides]
        PEAKS["float32"] = matmul_peak(device, torch.float32, sides)
        if sizes.bf16:
            PEAKS["bfloat16"] = matmul_peak(device, torch.bfloat16, sides)
    return PEAKS
