"""TensorFlow's oneDNN CPU kernels: on in tfdpfair's binaries and benchmarks, a switch for users.

TensorFlow turns its oneDNN kernels on by default only on x86 CPUs with AVX-512 or AMX
features; elsewhere (e.g. an AVX2-only AMD EPYC) it runs its plain Eigen kernels unless
``TF_ENABLE_ONEDNN_OPTS=1`` is set *before TensorFlow is imported* (the switch is read once).
On such a 2-core AMD EPYC (benchmarks/conv_kernels.py, a [128, 32, 32, 64] → 64 3×3 conv),
oneDNN made the forward conv 0.082 → 0.063 s, the input gradient 0.121 → 0.064 s, the kernel
gradient 0.111 → 0.083 s and im2col per-example norms 0.259 → 0.094 s, and it gives the
grouped Conv2DBackpropFilter that ghost clipping's native per-example kernel gradients need
(privacy/ghost_linear.py). WRN-16-4 at B = 128: the non-private step 3.44 → 2.50 s, the
ghost-clipped DP step 5.56 → 3.74 s (benchmarks/clipping_methods.py --q1; docs/benchmarks.md,
"oneDNN"). Results agree with the Eigen kernels to float32 rounding; the test suite runs with
oneDNN, and test_tf_cpu.py checks ghost clipping on the Eigen kernels.

This module never imports TensorFlow.
"""

from __future__ import annotations

import os
import sys

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn() -> str:
    """Ask for TensorFlow's oneDNN CPU kernels, if that is still possible and the user did not
    choose. Call before ``import tensorflow``. Returns what holds afterwards:

    * ``"on"``: ``TF_ENABLE_ONEDNN_OPTS=1`` is set (by this call or before it);
    * ``"off (TF_ENABLE_ONEDNN_OPTS=<v>)"``: the user set another value, which is kept;
    * ``"unchanged (TensorFlow already imported)"``: too late to switch; TF's own default holds.
    """
    value = os.environ.get(ONEDNN_ENV)
    if value is not None:
        return "on" if value.strip().lower() in ("1", "true") else f"off ({ONEDNN_ENV}={value})"
    if "tensorflow" in sys.modules:
        return "unchanged (TensorFlow already imported)"
    os.environ[ONEDNN_ENV] = "1"
    return "on"


def onednn_setting() -> str:
    """The value of TF_ENABLE_ONEDNN_OPTS (``"default"`` if unset), for benchmark records."""
    return os.environ.get(ONEDNN_ENV, "default")
