"""One conv layer's kernels at B = 128, with TensorFlow's oneDNN CPU kernels and without.

For WRN-16-4's three 3×3 layer shapes at 32×32 (input [B, H, W, C] → C channels, stride 1,
SAME): the forward conv, the input gradient and the batched kernel gradient (what the
non-private step runs), and the three ways ghost clipping can form every example's squared
kernel-gradient norm (privacy/ghost_linear.py):

  native   per-example gradients by one grouped Conv2DBackpropFilter per 4 examples
           (conv_per_example_gradients; needs oneDNN/cuDNN: null without it);
  patches  im2col patches + a batched matmul, 16 examples at a time;
  gram     two T×T Gram matrices per example, 16 examples at a time.

One JSON line per (setting, layer): median seconds of --repeats calls after one warm-up, each
setting in its own process (TF_ENABLE_ONEDNN_OPTS is read when TensorFlow loads). These are the
numbers behind tf_cpu.py and ghost_linear.NATIVE_MIN_POSITIONS (docs/benchmarks.md, "oneDNN").

  python benchmarks/conv_kernels.py                 # both settings (≈ 2 min, 2 cores)
  python benchmarks/conv_kernels.py --onednn 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LAYERS = ((32, 64), (16, 128), (8, 256))  # (H = W, C)
BATCH = 128


def median_seconds(fn, args, repeats: int) -> float:
    import tensorflow as tf

    [t.numpy() for t in tf.nest.flatten(fn(*args))]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        [t.numpy() for t in tf.nest.flatten(fn(*args))]
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def per_example_norms(form, x, dz, chunk: int):
    """Σ over chunks of `form(x_chunk, dz_chunk)` -> [B] squared norms."""
    import tensorflow as tf

    return tf.concat([form(x[i:i + chunk], dz[i:i + chunk])
                      for i in range(0, int(x.shape[0]), chunk)], 0)


def measure(repeats: int) -> None:
    import tensorflow as tf

    from tfdpfair.privacy import ghost_linear as gl

    native_ok = gl.native_grouped_backprop_supported()
    for hw, c in LAYERS:
        x = tf.random.stateless_normal([BATCH, hw, hw, c], [0, 1])
        dz = tf.random.stateless_normal([BATCH, hw, hw, c], [0, 2])
        k = tf.random.stateless_normal([3, 3, c, c], [0, 3])
        shape = [3, 3, c, c]

        def patches_and_grads(xs, ds):
            n = int(xs.shape[0])
            a = gl.group_major(gl.grouped_patches(xs, (3, 3), (1, 1), "SAME", 1, n))
            return a, gl.group_major(tf.reshape(ds, [n, -1, 1, c]))

        def native(xs, ds):
            g = gl.conv_per_example_gradients(xs, ds, shape, (1, 1), "SAME", 1, 1)
            return tf.reduce_sum(tf.square(g), [1, 2, 3])

        def patches(xs, ds):
            a, d = patches_and_grads(xs, ds)
            return tf.reduce_sum(tf.square(tf.linalg.matmul(a, d, transpose_a=True)), [1, 2, 3])

        def gram(xs, ds):
            a, d = patches_and_grads(xs, ds)
            return tf.reduce_sum(tf.linalg.matmul(a, a, transpose_b=True)
                                 * tf.linalg.matmul(d, d, transpose_b=True), [1, 2, 3])

        cases = {
            "forward": (lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"), (x, k)),
            "input_gradient": (lambda k, dz: tf.raw_ops.Conv2DBackpropInput(
                input_sizes=[BATCH, hw, hw, c], filter=k, out_backprop=dz,
                strides=[1, 1, 1, 1], padding="SAME"), (k, dz)),
            "batched_kernel_gradient": (lambda x, dz: tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=shape, out_backprop=dz, strides=[1, 1, 1, 1],
                padding="SAME"), (x, dz)),
            "norms_patches": (lambda x, dz: per_example_norms(patches, x, dz, 16), (x, dz)),
            "norms_gram": (lambda x, dz: per_example_norms(gram, x, dz, 16), (x, dz)),
        }
        if native_ok:
            cases["norms_native"] = (lambda x, dz: per_example_norms(native, x, dz, 4), (x, dz))
        seconds = {name: median_seconds(tf.function(fn), args, repeats)
                   for name, (fn, args) in cases.items()}
        seconds.setdefault("norms_native", None)
        print(json.dumps({"benchmark": "conv_kernels", "input": [BATCH, hw, hw, c],
                          "positions_T": hw * hw, "kernel": shape, "seconds": seconds,
                          "native_grouped_backprop": native_ok, **_machine()}), flush=True)


def _machine() -> dict:
    import poisson_steps  # benchmarks/, on sys.path for a script

    return poisson_steps.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onednn", choices=["both", "0", "1"], default="both")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.onednn == "both":
        for value in ("0", "1"):
            env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=value, TF_CPP_MIN_LOG_LEVEL="3")
            subprocess.run([sys.executable, __file__, "--onednn", value,
                            "--repeats", str(args.repeats)], env=env, check=True)
        return
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = args.onednn  # before TensorFlow loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    measure(args.repeats)


if __name__ == "__main__":
    main()
