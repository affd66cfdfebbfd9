"""espstream: streaming int8 conversion of temporal ONNX models for Espressif ESP-DL."""

__version__ = "0.1.0"
