"""Workstation-side export tools: CLIP/TFLite -> ONNX, MLLM -> GGUF. Each writes a manifest."""
