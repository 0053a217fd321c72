"""Quantization: per-layer FP32/INT8/INT4 policies, the ONNX Runtime and Neural Compressor engines, the stage, and
the pieces the joint architecture + precision search uses (docs/architecture.md, "Quantization")."""
