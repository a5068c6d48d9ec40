"""Which parts of the ghost-clipping step lower to XLA (what a TPU would run), checked on CPU.

A TPU compiles every step with XLA; an op without an XLA kernel (or one whose shapes XLA cannot
make static) fails there. For each case this lowers the compiled ghost step to HLO with
``tf.function(jit_compile=True).experimental_get_compiler_ir(...)(stage="hlo")`` (lowering only,
nothing is run) and, with ``--run``, also runs it once and compares the clipped sum with the
non-XLA step (max relative difference). One JSON line per case: ok / the error's first line,
the number of HLO instructions, and the op types in the traced TF graph.

Cases: models (WRN-16-4 32×32, NFNet-F0 at ``--f0-size``, a model with a layer that has no
ghost rule, so its variable takes the ``tf.vectorized_map`` fallback) × conv_mode (auto, ghost,
direct) × ghost_linear.NATIVE_WEIGHTED_SUM (on/off).

  python benchmarks/xla_lowering.py [--run] [--f0-size 64]
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import collections
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ghost_memory import machine_info  # noqa: E402


def fallback_model():
    """A small conv net whose last layer (a per-channel Scale) has no ghost rule."""
    import keras

    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

        def call(self, x):
            return x * self.w

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = Scale()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def build(name: str, batch: int, f0_size: int):
    import keras
    import numpy as np
    import tensorflow as tf

    from tfdpfair.models.nfnet import build_nfnet
    from tfdpfair.models.wide_resnet import build_wide_resnet

    keras.utils.set_random_seed(0)
    if name == "wrn_16_4":
        shape, model = (32, 32, 3), build_wide_resnet((16, 4), 10, (32, 32, 3))
    elif name == "nfnet_f0":
        shape = (f0_size, f0_size, 3)
        model = build_nfnet("F0", 10, shape, drop_rate=0.0, stochdepth_rate=0.0)
    else:
        shape, model = (16, 16, 3), fallback_model()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch,) + shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch).astype(np.int32))
    return model, x, y


def run_case(name: str, conv_mode: str, native_sum: bool, args) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from tfdpfair.privacy import ghost_clipping as gc
    from tfdpfair.privacy import ghost_linear as gl

    gl.NATIVE_WEIGHTED_SUM = native_sum
    model, x, y = build(name, args.batch, args.f0_size)
    fn = gc.batch_example_loss_fn(model, keras.losses.SparseCategoricalCrossentropy(True))
    mask = tf.ones([args.batch])

    def step(x, y):
        return gc.ghost_clipped_grad_sum(model, fn, model.trainable_variables, (x, y), mask, 1.0,
                                         has_aux=True, conv_mode=conv_mode).grad_sum

    line = {"benchmark": "xla_lowering", "model": name, "batch": args.batch,
            "conv_mode": conv_mode, "native_weighted_sum": native_sum,
            "fallback_variables": len(gc.describe_plan(model)["fallback"])}
    graph = tf.function(step).get_concrete_function(x, y).graph
    line["tf_op_types"] = dict(collections.Counter(op.type for op in graph.get_operations())
                               .most_common(12))
    jitted = tf.function(step, jit_compile=True)
    start = time.perf_counter()
    try:
        hlo = jitted.experimental_get_compiler_ir(x, y)(stage="hlo")
        line.update(lowers=True, hlo_instructions=hlo.count("\n"))
    except Exception as error:  # noqa: BLE001 (report whatever XLA rejects)
        line.update(lowers=False, error=f"{type(error).__name__}: "
                    + str(error).strip().splitlines()[0][:300])
    line["lower_s"] = round(time.perf_counter() - start, 1)
    if args.run and line["lowers"]:
        ref = [g.numpy() for g in tf.function(step)(x, y)]
        got = [g.numpy() for g in jitted(x, y)]
        line["max_rel_diff_vs_no_xla"] = float(max(
            np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12) for a, b in zip(ref, got)))
    return {**line, **machine_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["wrn_16_4", "nfnet_f0", "fallback"])
    parser.add_argument("--conv-modes", nargs="+", default=["auto", "ghost", "direct"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--f0-size", type=int, default=64)
    parser.add_argument("--run", action="store_true", help="also run and compare with no XLA")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in args.models:
        for mode in args.conv_modes:
            for native_sum in (True, False):
                print(json.dumps(run_case(name, mode, native_sum, args)), flush=True)


if __name__ == "__main__":
    main()
