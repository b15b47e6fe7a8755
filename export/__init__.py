"""Optimization passes for the model zoo: INT8 quantization, FP16, distillation, edge bundles, report."""
