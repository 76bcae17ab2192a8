"""Stage 4, serving: ONNX export and its parity, the manifest, the latency budget's choice, members
served from checkpoints or ONNX sessions, and the submission."""
