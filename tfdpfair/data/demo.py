"""Built-in demo data: scikit-learn's handwritten digits, split into public and private parts.

The data ship inside scikit-learn (1,797 grayscale 8×8 images of the digits 0–9, pixel values
0–16), so the demo needs no download. They are split, deterministically under a seed and
stratified by class, into

* ``public``:  pre-training data, treated as non-sensitive (like ImageNet for CheXpert);
* ``private``: the sensitive training set that DP-SGD protects (N examples);
* ``test``:    held-out evaluation data for accuracy and the fairness report.

Images are scaled to [0, 1] and optionally upsampled (nearest neighbour) to ``image_size``.

Subgroup attribute ``ink``: the digits carry no demographics, so the demo uses a real property
of each image that varies between writers: how much ink the digit uses, i.e. the sum of its 64
pixel values. Examples are binned into "light", "medium" and "heavy" strokes at the 1/3 and
2/3 quantiles of the *public* split (so no private statistic is used to define the groups).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

INK_GROUPS = ("light", "medium", "heavy")
CLASS_NAMES = tuple(str(d) for d in range(10))


@dataclasses.dataclass(frozen=True)
class Split:
    """One split: images [N, H, W, 1] float32 in [0, 1], labels [N] int32, groups per attribute."""

    images: np.ndarray
    labels: np.ndarray
    groups: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class DemoData:
    public: Split
    private: Split
    test: Split
    class_names: tuple[str, ...] = CLASS_NAMES


def ink_amount(images: np.ndarray) -> np.ndarray:
    """Total ink of each image: the sum of its pixel values (images in [0, 1] at 8×8)."""
    return images.reshape(images.shape[0], -1).sum(axis=1)


def ink_groups(ink: np.ndarray, thresholds: tuple[float, float]) -> np.ndarray:
    """Bins ink into "light" (< t1), "medium" (< t2) and "heavy" (>= t2)."""
    codes = np.digitize(ink, thresholds)
    return np.asarray(INK_GROUPS, dtype=object)[codes].astype(str)


def upsample(images: np.ndarray, image_size: int) -> np.ndarray:
    """Nearest-neighbour upsampling of [N, 8, 8, 1] images to [N, S, S, 1], S a multiple of 8."""
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}.")
    factor = image_size // 8
    return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)


def load_demo_data(public_fraction: float = 0.3, test_fraction: float = 0.2,
                   image_size: int = 8, seed: int = 0) -> DemoData:
    """Loads the digits and splits them into public / private / test (stratified by class)."""
    if not (0 < public_fraction < 1 and 0 < test_fraction < 1
            and public_fraction + test_fraction < 1):
        raise ValueError("public_fraction and test_fraction must be in (0, 1) and sum to < 1; got "
                         f"{public_fraction} and {test_fraction}.")
    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    index = np.arange(len(labels))
    rest, test_idx = train_test_split(index, test_size=test_fraction, random_state=seed,
                                      stratify=labels)
    public_idx, private_idx = train_test_split(
        rest, test_size=1.0 - public_fraction / (1.0 - test_fraction), random_state=seed,
        stratify=labels[rest])
    ink = ink_amount(images)
    thresholds = tuple(np.quantile(ink[public_idx], [1 / 3, 2 / 3]))
    scaled = images if image_size == 8 else upsample(images, image_size)

    def split(idx: np.ndarray) -> Split:
        idx = np.sort(idx)
        return Split(scaled[idx], labels[idx], {"ink": ink_groups(ink[idx], thresholds)})

    return DemoData(split(public_idx), split(private_idx), split(test_idx))
