"""Rated dense matmul peaks of accelerators, for MFU against the chip's rated peak.

MFU here is model FLOPs per second (``counting.flops_per_token``: the useful matmul FLOPs of a
training step, attention included) over the peak below for the compute dtype of the run. The
peaks are the vendors' dense figures: NVIDIA's datasheets give tensor-core throughput "with
sparsity" (2:4 structured), twice the dense rate, so each GPU figure is half the datasheet's;
Google's TPU pages give the dense bf16 peak per chip. A float32 run is held to the TF32
tensor-core figure on NVIDIA GPUs (JAX's default matmul precision runs float32 matmuls there as
TF32) and to the bf16 figure on TPUs (the default precision is one bf16 pass). A device not in
the table (a CPU, a variant whose figures differ, such as the PCIe-card NVL parts) has no rated
peak: its MFU is left out rather than guessed.

The benchmarks (``bench``) report MFU against this rated peak beside MFU against a matmul peak
measured in the same run; the two differ because no library reaches the rated peak (JAX's
8192^3 bf16 matmul ran at 605 TFLOP/s on an H200, 61% of its 989.4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TFLOPS = 1e12


@dataclass(frozen=True)
class RatedPeak:
    """A chip's rated dense matmul peak for one compute dtype."""

    chip: str
    dtype: str
    flops: float
    source: str


# (pattern on the lower-cased JAX device kind, chip, {dtype: dense TFLOP/s}, source). First match
# wins: specific variants before the generic name.
_NV_H100 = ("NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): "
            "BF16/FP16 1,979 and TF32 989 TFLOPS with sparsity (SXM); dense is half")
_NV_H100_PCIE = ("NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): "
                 "BF16/FP16 1,513 and TF32 756 TFLOPS with sparsity (PCIe); dense is half")
_NV_H200 = ("NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200): "
            "BF16/FP16 1,979 and TF32 989 TFLOPS with sparsity (SXM); dense is half")
_NV_A100 = ("NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100): "
            "BF16/FP16 312 and TF32 156 TFLOPS dense (624 / 312 with sparsity)")
_NV_B200 = ("NVIDIA HGX B200 datasheet (nvidia.com/en-us/data-center/hgx): per GPU BF16/FP16 "
            "4.5 and TF32 2.2 PFLOPS with sparsity; dense is half")
_TPU = "Google Cloud TPU {v} system architecture page (cloud.google.com/tpu/docs/{v}): peak bf16 per chip"

RATED_PEAKS: tuple[tuple[str, str, dict[str, float], str], ...] = (
    (r"h100.*(nvl)", "", {}, ""),  # H100 NVL: other clocks and power, not in the table
    (r"h100.*pcie", "H100 PCIe", {"bfloat16": 756.5, "float16": 756.5, "float32": 378.0},
     _NV_H100_PCIE),
    (r"h100", "H100 SXM", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}, _NV_H100),
    (r"h200.*nvl", "", {}, ""),  # H200 NVL: not in the table
    (r"h200", "H200 SXM", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}, _NV_H200),
    (r"a100", "A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}, _NV_A100),
    (r"b200", "B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1100.0}, _NV_B200),
    (r"tpu v4", "TPU v4", {"bfloat16": 275.0, "float32": 275.0}, _TPU.format(v="v4")),
    (r"tpu v5 ?(lite|e)", "TPU v5e", {"bfloat16": 197.0, "float32": 197.0}, _TPU.format(v="v5e")),
    (r"tpu v5p?$", "TPU v5p", {"bfloat16": 459.0, "float32": 459.0}, _TPU.format(v="v5p")),
    (r"tpu v6 ?(lite|e)", "TPU v6e", {"bfloat16": 918.0, "float32": 918.0}, _TPU.format(v="v6e")),
)


def rated_peak(device_kind: str, dtype: str) -> RatedPeak | None:
    """The rated dense peak of a device (``jax.devices()[0].device_kind``, e.g. "NVIDIA H200",
    "NVIDIA H100 80GB HBM3", "TPU v5 lite") for a compute dtype ("bfloat16", "float16",
    "float32"); None for a device or dtype not in ``RATED_PEAKS``."""
    kind = device_kind.strip().lower()
    for pattern, chip, peaks, source in RATED_PEAKS:
        if re.search(pattern, kind):
            if dtype not in peaks:
                return None
            return RatedPeak(chip, dtype, peaks[dtype] * TFLOPS, source)
    return None


def mfu(tokens_per_s: float | None, flops_per_token: float, peak: RatedPeak | None) -> float | None:
    """Model FLOPs utilisation: tokens/s x FLOPs per token / the rated peak (None without one)."""
    if peak is None or tokens_per_s is None:
        return None
    return tokens_per_s * flops_per_token / peak.flops
