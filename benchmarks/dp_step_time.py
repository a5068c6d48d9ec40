"""DP-SGD step time over non-private step time on the demo model; prints one JSON line.

One logical step of B examples (B/m micro-batches of m for DP: per-example gradients, clipping,
accumulation, noise, optimizer update) against one non-private step on the same B examples
(mean-gradient backward pass, optimizer update). DP is timed through DPModel.fit (one logical
step per Keras batch, including the host's ε update), the baseline through train_on_batch, in
the same process after warm-up; the ratio is the number to compare across machines.

  python benchmarks/dp_step_time.py [--model nfnet_nano] [--image-size 8] [--batch 256]
"""

from __future__ import annotations

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
from step_timer import StepTimer  # noqa: E402  (benchmarks/, on sys.path for a script)
from tfdpfair.data.demo import load_demo_data  # noqa: E402
from tfdpfair.privacy.dp_sgd import DPConfig  # noqa: E402
from tfdpfair.training.dp_model import make_private  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="nfnet_nano")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256, help="logical batch B")
    parser.add_argument("--micro-batch", type=int, default=64, help="micro-batch m")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--clipping", default="auto", choices=["auto", "vectorized", "ghost"])
    args = parser.parse_args()
    if args.batch % args.micro_batch:
        parser.error("--batch must be a multiple of --micro-batch.")

    data = load_demo_data(image_size=args.image_size)
    x = np.resize(data.private.images, (args.batch,) + data.private.images.shape[1:])
    y = np.resize(data.private.labels, (args.batch,))
    shape, classes = x.shape[1:], len(data.class_names)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    keras.utils.set_random_seed(0)
    plain = registry.build_model(args.model, shape, classes)
    plain.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, jit_compile=False)

    private_model = registry.build_model(args.model, shape, classes)
    dp = make_private(private_model, DPConfig(
        expected_batch_size=args.batch, micro_batch_size=args.micro_batch,
        noise_multiplier=1.0, noise_seed=0, sampling_seed=0, clipping=args.clipping))
    dp.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    # N = B, so q = 1: every logical step holds all B examples (B/m micro-batches), like the
    # non-private step on the same B examples. Each Keras batch of fit() is one logical step.
    timer = StepTimer()
    dp.fit(x, y, steps=args.repeats + 2, verbose=0, callbacks=[timer])
    dp_times = timer.times[2:]  # the first calls trace and warm up

    plain_times = []
    plain.train_on_batch(x, y), plain.train_on_batch(x, y)
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain.train_on_batch(x, y)
        plain_times.append(time.perf_counter() - start)
    dp_s, plain_s = statistics.median(dp_times), statistics.median(plain_times)
    print(json.dumps({
        "benchmark": "dp_step_time", "model": args.model, "image_size": args.image_size,
        "params": int(plain.count_params()), "logical_batch": args.batch,
        "micro_batch": args.micro_batch, "clipping": args.clipping, "dp_step_s": round(dp_s, 4),
        "non_private_step_s": round(plain_s, 4), "dp_over_non_private": round(dp_s / plain_s, 2),
        "dp_examples_per_s": round(args.batch / dp_s, 1), "repeats": args.repeats,
        "tensorflow": tf.__version__, "cpu_count": os.cpu_count(),
        "machine": platform.machine()}))


if __name__ == "__main__":
    main()
