"""Example FP32 ONNX models built in code (see :mod:`models.build`)."""
