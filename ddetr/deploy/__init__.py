"""Deployment: a trained checkpoint as an ONNX file (`onnx`) and as an online detection service on Ray Serve
(`serve`)."""
