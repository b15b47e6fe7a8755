"""Model families: training scripts, ONNX export and publication into a model repository.

HELPERS: the shared contract (the "$(CONTRACT)" section of your prompt) is in models/CONTRACT.md — read it first.
"""
