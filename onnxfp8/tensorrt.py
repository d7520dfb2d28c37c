"""TensorRT's Q/DQ placement knowledge, in one place: what selection (``rules.TensorRTRule``, --target
tensorrt) decides and what ``onnxfp8 lint`` checks come from these functions, so the two cannot drift.

The functions work on plain data (an op type, its attributes as a dict, shapes), so the selection rule can
call them with graphsurgeon nodes and lint with ONNX NodeProtos.

Sources: TensorRT's "Working with Quantized Types" (FP8 is FP8E4M3 only, symmetric) and "Explicit
Quantization" (quantize all inputs of weighted layers, per-tensor activations, per-channel weights along the
output-channel axis of the right operand); NVIDIA TensorRT-Model-Optimizer, modelopt/onnx/quantization/
graph_utils.py (FP8 Convs need >= 16 input and output channels and a filter of at most 32 taps; GEMV and
K/N < 16 stay in high precision). Channel counts must be multiples of 16: FP8 Tensor Core GEMMs need 16-byte
aligned K and N.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
from onnx import TensorProto

CHANNEL_MULTIPLE = 16  # FP8 Conv/GEMM kernels: channel counts (K, N) multiples of 16
MAX_FP8_FILTER = 32  # FP8 convolution kernels: kernel area kh*kw*... at most 32
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the layers TensorRT runs on quantized weights
# ops TensorRT fuses with their input DQs (besides the weighted ones): pooling, concatenation, residual Add
FUSABLE = WEIGHTED + ("Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat")
QUANTIZED_TYPES = {TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN", TensorProto.INT8: "INT8"}


def weight_axis(op: str, attrs: Mapping[str, Any], index: int, rank: int) -> Optional[int]:
    """The axis TensorRT takes a per-channel weight scale on for input ``index`` of ``op``, or None when it
    takes that input per tensor only: the weight input (1) of a weighted layer, on its output channels."""
    if op not in WEIGHTED or index != 1:
        return None
    from onnxfp8.rules import channel_axis

    return channel_axis(op, attrs, index, rank)


def _static(shape: Optional[Sequence[Any]], axis: int) -> Optional[int]:
    if not shape or not -len(shape) <= axis < len(shape):
        return None
    d = shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d > 0 else None


def weighted_problem(op: str, attrs: Mapping[str, Any], weight_shape: Sequence[int],
                     act_shape: Optional[Sequence[Any]] = None) -> Optional[str]:
    """Why TensorRT will not run this Conv/ConvTranspose/Gemm/MatMul in FP8 (channel counts, per-group
    channels, filter size, GEMV), or None. ``act_shape``: the activation input's shape when known (static
    dims as ints) for the GEMV check."""
    m = CHANNEL_MULTIPLE
    shape = tuple(int(d) for d in weight_shape)
    if op in ("Conv", "ConvTranspose"):
        if len(shape) < 3:
            return f"{op} weight of rank {len(shape)}"
        group = int(attrs.get("group", 1) or 1)
        if op == "Conv":
            cout, cin = shape[0], shape[1] * group
        else:
            cin, cout = shape[0], shape[1] * group
        if cin % m or cout % m:
            return (f"{op} with {cin} input / {cout} output channels: TensorRT's FP8 convolution kernels need "
                    f"channel counts that are multiples of {m}")
        if group > 1 and shape[1] % m:
            return (f"grouped {op} with {shape[1]} channels per group: TensorRT's FP8 convolution "
                    f"kernels need multiples of {m} per group")
        area = int(np.prod(shape[2:]))
        if area > MAX_FP8_FILTER:
            return (f"{op} filter of {'x'.join(map(str, shape[2:]))} = {area} taps: TensorRT's FP8 "
                    f"convolution kernels take at most {MAX_FP8_FILTER}")
        return None
    if len(shape) < 2:
        return f"{op} weight of rank {len(shape)}"
    if op == "Gemm" and attrs.get("transB", 0):
        n, k = shape[-2], shape[-1]
    else:
        k, n = shape[-2], shape[-1]
    if k % m or n % m:
        return f"{op} weight [K={k}, N={n}]: TensorRT's FP8 GEMM kernels need K and N to be multiples of {m}"
    if act_shape is not None:
        rank = len(act_shape)
        rows = _static(act_shape, 0 if op == "Gemm" else -2) if rank >= 2 else (1 if rank == 1 else None)
        if op == "Gemm" and attrs.get("transA", 0):
            rows = _static(act_shape, 1)
        if rows == 1:
            return f"{op} is a GEMV (one row): FP8 tensor cores gain nothing, TensorRT runs it in high precision"
    return None
