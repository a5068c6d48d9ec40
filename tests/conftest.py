"""Shared test set-up: quiet TensorFlow, deterministic seeds, and TensorFlow's oneDNN CPU
kernels, as the binaries and benchmarks run them (tfdpfair/tf_cpu.py): with them ghost
clipping's native per-example conv gradients run on every x86 CPU, so the suite tests them;
test_tf_cpu.py runs the plain Eigen kernels in a subprocess."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
