"""The naming contract of the tensors onnxfp8 adds to a graph, in one place.

insert_qdq / emulate write these names; verify (per-layer matching, lint) and remeasure_ranges read them
back, so they are defined here once and never spelled out as literals elsewhere. ``<t>`` is the name of the
quantized tensor (an activation keeps its name on the FP32 producer's output; a weight whose consumers are
all quantized gives its name to the dequantized value)."""
from __future__ import annotations

DQ = ".dq"  # <t>.dq: the dequantized activation (or weight read also by FP32 nodes)
RELU_Q = ".relu_q"  # <t>.relu_q: the output of the Relu clone that quantized consumers read
SCALE = ".scale"  # <t>.scale: the scale constant (or the run-time scale of a dynamic activation)
ZERO_POINT = ".zero_point"
QUANTIZED = ".quantized"  # <w>.quantized: the FP8 / INT8 / E3M4-code initializer of a weight
FP32 = ".fp32"  # <w>.fp32: the FP32 weight renamed out of the way of its dequantized twin
UNFOLDED = ".unfolded"  # <w>.unfolded: a weight fragment replaced by BatchNorm folding (removed by cleanup)
# FP16 fallback islands (passes/fp16_fallback.py): <t>.fp16 the FP16 value of a tensor (a Cast output, or an FP16
# initializer for a weight), <t>.fp16_f32 that value back in FP32 (what the island's node reads), <y>.acc the
# island node's FP32 result before it is rounded to FP16 (the rounded value keeps the name <y>)
FP16 = ".fp16"
FP16_F32 = ".fp16_f32"
ACC = ".acc"
CODE_TABLE = ".code_table"  # <format>.code_table: the 256-entry decode table of an emulated format (E3M4)
QUANTIZED_OUTPUTS = (DQ, RELU_Q)  # names whose value is a quantized one (verify/layers.py)
SIZE_SUFFIX = "__onnxfp8_size"  # <t>__onnxfp8_size: the Size output the collectors add to count elements


def dq(t: str) -> str:
    return t + DQ


def relu_q(t: str) -> str:
    return t + RELU_Q


def scale(t: str) -> str:
    return t + SCALE


def zero_point(t: str) -> str:
    return t + ZERO_POINT


def quantized(t: str) -> str:
    return t + QUANTIZED


def fp32(t: str) -> str:
    return t + FP32


def fp16(t: str) -> str:
    return t + FP16


def fp16_f32(t: str) -> str:
    return t + FP16_F32


def acc(t: str) -> str:
    return t + ACC
