"""heimdex_clip_export: build-time export of an open_clip model to a verified INT8 ONNX artifact.

Depends on torch/open_clip/onnx (the ``export`` extra) and on ``heimdex_clip`` for the manifest
schema and the preprocessing it must match; the runtime never imports this package.
"""
