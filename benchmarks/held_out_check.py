"""Time of DPModel.fit's held-out check (training/held_out.py) for MNIST-sized data.

Hashes N training rows and M validation rows (float32, 28x28 by default) and counts validation
rows equal to training rows, as ``guards.check_validation_is_held_out`` does once per fit: once
with a genuinely held-out split (nothing to confirm) and once with a full copy (every row
confirmed byte by byte, the worst case). Prints one JSON line with the best of ``--repeats``.

  python benchmarks/held_out_check.py [--n 60000] [--m 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tfdpfair.training import held_out


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--m", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    train = rng.random((args.n, 28, 28), dtype=np.float32)
    val = rng.random((args.m, 28, 28), dtype=np.float32)
    assert held_out.count_rows_in_training(train, val) == 0
    assert held_out.count_rows_in_training(train, train.copy()) == args.n
    print(json.dumps({
        "benchmark": "held_out_check", "n": args.n, "m": args.m, "row_shape": [28, 28],
        "dtype": "float32",
        "held_out_s": round(best_time(lambda: held_out.count_rows_in_training(train, val),
                                      args.repeats), 3),
        "full_copy_s": round(best_time(lambda: held_out.count_rows_in_training(
            train, train.copy()), args.repeats), 3),
    }))


if __name__ == "__main__":
    main()
