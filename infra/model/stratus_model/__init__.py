"""Model pipeline: GGUF -> ONNX (fp32 / int8 / int4) with tokenizer, chat template and manifest.

Runs on a developer machine or in CI, never in a Lambda. No torch, no model hub.
"""
