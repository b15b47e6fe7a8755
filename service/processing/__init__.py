"""Per-family processing: an image, WAV, text or user id -> model input, and model output -> an answer.

One module per family, used by the task endpoints (through the core), offline inference (`modelserve
predict`) and the edge bundle alike. Nothing here knows about HTTP or gRPC.
"""
