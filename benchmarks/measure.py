"""Measurements for the benchmarks: alternating timings, peak memory, matmul FLOPs (the in-place matmuls
included), the machine's matmul rate, a profile of the dense-FLOP part, and the JSON-line recorder."""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
# in-place matmuls: neither the profiler nor FlopCounterMode gives them FLOPs, so they are counted from their shapes
IN_PLACE_OPS = (torch.ops.aten.addmm_, torch.ops.aten.baddbmm_)
IN_PLACE_MATMUL_OPS = tuple(f"aten::{op.__name__}" for op in IN_PLACE_OPS)  # their names in a profile



def median_times(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Run each function once to warm up, then `repeats` rounds in which they alternate."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():
        function()
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def peak_bytes(function: Callable[[], object]) -> int:
    """Peak of tensor memory allocated while `function` runs, above what was allocated when it started (from
    the profiler's memory events, which cover every CPU allocation)."""
    with tempfile.TemporaryDirectory() as folder:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            function()
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    memory = [event["args"] for event in events if event.get("name") == "[memory]"]
    if not memory:
        return 0
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(args["Total Allocated"] for args in memory) - start


def count_flops(function: Callable[[], object]) -> int:
    """Matmul FLOPs of one call, the in-place matmuls included (FlopCounterMode has no formula for them)."""

    def in_place(*shapes: list[int], out_shape: object = None, **kwargs: object) -> int:
        return _in_place_matmul_flops(list(shapes))

    with FlopCounterMode(display=False, custom_mapping=dict.fromkeys(IN_PLACE_OPS, in_place)) as counter:
        function()
    return counter.get_total_flops()


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square matmul: the machine's attainable dense rate."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    times = median_times({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * size**3 / statistics.median(times)


def _in_place_matmul_flops(shapes: list[list[int]]) -> int:
    """2 m k n (times the batch) from the shapes of addmm_(self [m, n], a [m, k], b [k, n]) or baddbmm_."""
    *batch, rows, inner = shapes[1]
    return 2 * math.prod(batch) * rows * inner * shapes[2][-1]


def dense_part_profile(function: Callable[[], object]) -> tuple[float, float, float, list[tuple[str, float]]]:
    """Profile one call: (matmul FLOPs, seconds in matmuls, total seconds, top ops by self time). Matmuls are the
    plain and batched ones and the in-place ones (an in-place matmul inside another is counted once)."""
    function()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        function()
    flops, seconds = 0, 0.0
    for event in prof.events():
        if event.name in MATMUL_OPS:
            flops += event.flops
        elif event.name in IN_PLACE_MATMUL_OPS:
            parent = event.cpu_parent
            if parent is None or parent.name not in IN_PLACE_MATMUL_OPS + MATMUL_OPS:
                flops += _in_place_matmul_flops(event.input_shapes)
        else:
            continue
        seconds += event.self_cpu_time_total / 1e6
    averages = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in averages) / 1e6
    top = sorted(((event.key, event.self_cpu_time_total / 1e6) for event in averages), key=lambda item: -item[1])
    return flops, seconds, total, top[:8]


class Recorder:
    def __init__(self, json_path: str | None) -> None:
        self.rows: list[dict] = []
        self.handle = open(json_path, "w") if json_path else None

    def add(self, **row) -> None:
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if self.handle:
            self.handle.write(line + "\n")
            self.handle.flush()
