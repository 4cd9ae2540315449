"""What is built and what is kept: config → encoders + fusion (build), the assembled network, the
model directory (artifact) and its ONNX export."""
