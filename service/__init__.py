"""modelserve server: model repository, dynamic batcher on ONNX Runtime, KServe V2 transports, metrics."""

__version__ = "0.1.0"
