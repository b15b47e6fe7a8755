"""Model families: training scripts, ONNX export and publication into a model repository (see CONTRACT.md)."""
