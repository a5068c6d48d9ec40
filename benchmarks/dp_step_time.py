"""DP-SGD step time over non-private step time on the demo model; prints one JSON line.

One logical step of expected size B (its k_t micro-batches of m for DP: per-example gradients,
clipping, accumulation, noise, optimizer update) against one non-private step on B examples
(mean-gradient backward pass, optimizer update). DP is timed through DPModel.fit on N = 10·B
examples, so q = 0.1 and each step holds |S_t| ~ Binomial(N, q) examples padded to micro-batches
as in a real run (``--q1``: N = B, every step exactly B); one logical step per Keras batch,
including the host's ε update. The baseline is train_on_batch in the same process after
warm-up. The ratio compares time per *expected* example (mean DP step / non-private step on B);
``padded_row_share`` is the share of padding rows the DP steps computed.

  python benchmarks/dp_step_time.py [--model nfnet_nano] [--image-size 8] [--batch 256]
      [--padding auto|trim|full] [--q1]
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfdpfair.models import registry  # noqa: E402
import poisson_steps  # noqa: E402  (benchmarks/, on sys.path for a script)
from step_timer import StepTimer  # noqa: E402
from tfdpfair.data.demo import load_demo_data  # noqa: E402
from tfdpfair.privacy.dp_sgd import DPConfig  # noqa: E402
from tfdpfair.training.dp_model import make_private  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="nfnet_nano")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256, help="logical batch B")
    parser.add_argument("--micro-batch", type=int, default=64, help="micro-batch m")
    parser.add_argument("--repeats", type=int, default=20, help="timed logical steps")
    parser.add_argument("--clipping", default="auto", choices=["auto", "vectorized", "ghost"])
    parser.add_argument("--padding", default="auto", choices=["auto", "trim", "full"])
    parser.add_argument("--q1", action="store_true", help="N = B: every step holds all B")
    args = parser.parse_args()
    if args.q1 and args.batch % args.micro_batch:
        parser.error("with --q1, --batch must be a multiple of --micro-batch.")

    data = load_demo_data(image_size=args.image_size)
    plain_x = np.resize(data.private.images, (args.batch,) + data.private.images.shape[1:])
    plain_y = np.resize(data.private.labels, (args.batch,))
    x, y = poisson_steps.training_set(data.private.images, data.private.labels, args.batch,
                                      args.q1)
    shape, classes = x.shape[1:], len(data.class_names)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    keras.utils.set_random_seed(0)
    plain = registry.build_model(args.model, shape, classes)
    plain.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=False)

    private_model = registry.build_model(args.model, shape, classes)
    dp = make_private(private_model, DPConfig(
        expected_batch_size=args.batch, micro_batch_size=args.micro_batch,
        noise_multiplier=1.0, noise_seed=0, sampling_seed=0, clipping=args.clipping,
        microbatch_padding=args.padding))
    dp.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    timer, warmup = StepTimer(), 2
    dp.fit(x, y, steps=args.repeats + warmup, verbose=0, callbacks=[timer])
    dp_times = timer.times[warmup:]  # the first calls trace and warm up

    plain_times = []
    plain.train_on_batch(plain_x, plain_y), plain.train_on_batch(plain_x, plain_y)
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain.train_on_batch(plain_x, plain_y)
        plain_times.append(time.perf_counter() - start)
    dp_stats = poisson_steps.per_expected_example(dp_times, args.batch)
    plain_s = statistics.median(plain_times)
    print(json.dumps({
        "benchmark": "dp_step_time", "model": args.model, "image_size": args.image_size,
        "params": int(plain.count_params()), "logical_batch": args.batch,
        "num_examples": len(x), "sampling_rate": round(args.batch / len(x), 4),
        "micro_batch": args.micro_batch, "clipping": dp.clipping_method,
        "dp": dp_stats, **poisson_steps.padding_of_steps(dp, range(warmup, warmup + args.repeats)),
        "non_private_step_s": round(plain_s, 4),
        "dp_over_non_private_per_expected_example": round(dp_stats["step_s_mean"] / plain_s, 2),
        "repeats": args.repeats, "tensorflow": tf.__version__, "machine": platform.machine(),
        **poisson_steps.machine()}))


if __name__ == "__main__":
    main()
