"""The model repository's on-disk format, owned by the server and imported by `models/` and `export/`.

One module per fact: `layout` (folders, names, versions, containment), `config` (config.pbtxt and the graph
auto-complete), `card` (model card, family, variants), `publish` (atomic writes) and `sessions` (the one
ONNX Runtime session factory). Nothing here imports torch.
"""
