"""ragtop's runtime: running exported models (ONNX Runtime sessions, the plugin library)."""
