"""Input-pipeline throughput of the CheXpert reader on a synthetic CheXpert-v1.0-small copy.

Writes ``--num_images`` grayscale JPEGs of 320 x 390 (width x height, the size of most
CheXpert-small images) with a train.csv in the published column layout into a temporary
directory, reads them with tfdpfair.data.chexpert at ``--image_size`` through the same path the
DP trainer uses (Poisson-sampled index batches -> ``source.batches``), and prints ONE JSON line:

  {"benchmark": "chexpert_pipeline", "images_per_s": ..., ...settings...}

Usage: python benchmarks/chexpert_pipeline.py [--num_images 300 --image_size 224 ...]
"""

from __future__ import annotations

import tfdpfair.tf_cpu

tfdpfair.tf_cpu.prefer_onednn()  # before TensorFlow: docs/benchmarks.md, "oneDNN"

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_synthetic_chexpert(root: str, num_images: int, seed: int = 0) -> None:
    """A CheXpert-v1.0-small lookalike: random JPEGs (320 x 390) and a train.csv."""
    from PIL import Image

    from tfdpfair.data.chexpert import CHEXPERT_LABELS, CSV_COLUMNS

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, 390)[:, None] + np.linspace(0, 50, 320)[None, :]
    rows = []
    for i in range(num_images):
        patient, study = f"patient{i // 3 + 1:05d}", f"study{i % 3 + 1}"
        rel = f"train/{patient}/{study}/view1_frontal.jpg"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(os.path.join(root, rel), quality=90)
        labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=len(CHEXPERT_LABELS))
        rows.append([f"CheXpert-v1.0-small/{rel}", rng.choice(["Female", "Male"]),
                     int(rng.integers(18, 90)), "Frontal", "AP", *labels])
    pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(os.path.join(root, "train.csv"),
                                                         index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=300)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import tensorflow as tf

    from tfdpfair.data.chexpert import load_chexpert
    from tfdpfair.data.sources import ImageConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "CheXpert-v1.0-small")
        t0 = time.perf_counter()
        write_synthetic_chexpert(root, args.num_images, args.seed)
        write_s = time.perf_counter() - t0
        config = ImageConfig((args.image_size, args.image_size), args.channels)
        source = load_chexpert(root, "train_all", image_config=config)
        rng = np.random.default_rng(args.seed)
        n, b = len(source), args.batch_size
        # Poisson sampling with rate b/n, padded to a multiple of b with index 0 (as the sampler).
        index_batches = []
        for _ in range(args.epochs * max(1, n // b)):
            chosen = np.flatnonzero(rng.random(n) < b / n)
            padded = np.zeros(-(-max(len(chosen), 1) // b) * b, np.int64)
            padded[:len(chosen)] = chosen
            index_batches.extend(padded.reshape(-1, b))
        for _ in source.batches(index_batches[:1]):  # warm-up: tracing and file cache
            pass
        t0 = time.perf_counter()
        images = 0
        for batch in source.batches(index_batches):
            images += int(batch["image"].shape[0])
        elapsed = time.perf_counter() - t0
    print(json.dumps({
        "benchmark": "chexpert_pipeline", "images_per_s": round(images / elapsed, 1),
        "images": images, "seconds": round(elapsed, 3), "num_files": n,
        "source_size_wxh": [320, 390], "image_size": args.image_size,
        "channels": args.channels, "batch_size": b, "access": "poisson_index_batches",
        "write_seconds": round(write_s, 2), "cpu_count": os.cpu_count(),
        "tf_version": tf.__version__}))


if __name__ == "__main__":
    main()
