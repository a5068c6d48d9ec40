"""What a trimmed last micro-batch costs: the clipped-sum step traced for a static [m] batch vs
traced once for an unknown batch size (DPConfig.microbatch_padding="trim"), at several sizes.

One JSON line per (trace, rows): "static" = the [m] trace run on m rows (full padding computes
this for every micro-batch); "dynamic" = ONE trace with batch dimension None, run at s rows
(the trimmed last micro-batch). ``first_call_s`` is the first call at that size (a new shape:
TF/oneDNN per-shape set-up, no retrace), ``step_s`` the median of --repeats later calls.
Clipping only (no noise/update): the part whose cost depends on the rows.

  python benchmarks/last_microbatch.py --model wrn_16_4 --micro-batch 32 --method ghost
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import statistics
import time

import poisson_steps  # benchmarks/, on sys.path for a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="nfnet_nano")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--method", default="ghost", choices=["ghost", "vectorized"])
    parser.add_argument("--sizes", default=None, help="rows of the dynamic runs (default "
                        "8, 16, ... m)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    from clipping_methods import MODELS, build_model
    from tfdpfair.privacy.clipping import clipped_grad_sum
    from tfdpfair.privacy.ghost_clipping import batch_example_loss_fn, ghost_clipped_grad_sum
    from tfdpfair.training.example_loss import example_loss_fn

    m, shape = args.micro_batch, MODELS[args.model][2]
    model = build_model(args.model)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    if args.method == "ghost":
        batch_loss = batch_example_loss_fn(model, loss)

        def clip(x, y, mask):
            return ghost_clipped_grad_sum(model, batch_loss, variables, (x, y), mask, 1.0,
                                          has_aux=True).grad_sum
    else:
        unit = example_loss_fn(model, loss)

        def clip(x, y, mask):
            return clipped_grad_sum(unit, variables, (x, y), mask, 1.0, has_aux=True).grad_sum

    def spec(rows):
        return [tf.TensorSpec((rows,) + shape), tf.TensorSpec([rows], tf.int32),
                tf.TensorSpec([rows])]

    traces = {"static": tf.function(clip, input_signature=spec(m)),
              "dynamic": tf.function(clip, input_signature=spec(None))}
    rng = np.random.default_rng(0)
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else list(range(8, m, 8)) + [m])
    cases = [("static", m)] + [("dynamic", s) for s in sizes]
    for kind, rows in cases:
        x = tf.constant(rng.normal(size=(rows,) + shape).astype(np.float32))
        y = tf.constant(rng.integers(0, 10, rows).astype(np.int32))
        mask = tf.ones([rows])
        fn = traces[kind]
        start = time.perf_counter()
        [g.numpy() for g in fn(x, y, mask)]
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            [g.numpy() for g in fn(x, y, mask)]
            times.append(time.perf_counter() - start)
        step = statistics.median(times)
        print(json.dumps({
            "benchmark": "last_microbatch", "model": args.model, "method": args.method,
            "micro_batch": m, "trace": kind, "rows": rows, "first_call_s": round(first, 3),
            "step_s": round(step, 4), "s_per_row": round(step / rows, 5),
            "traces": fn.experimental_get_tracing_count(), **poisson_steps.machine()}),
            flush=True)


if __name__ == "__main__":
    main()
