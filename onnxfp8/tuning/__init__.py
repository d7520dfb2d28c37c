"""Accuracy-driven tuning: search quantization plans until a target holds on validation data (tune.py), and
the per-model table of formats x schemes x calibration methods (sweep.py). Both calibrate once and evaluate many
plans (evaluate.py)."""
from onnxfp8.tuning.evaluate import Evaluation, Evaluator, Target, Workspace

__all__ = ["Evaluation", "Evaluator", "Target", "Workspace"]
