"""Checks every image file a run will read, before its privacy plan is fixed (DESIGN.md inv. 10).

A file that cannot be read fails the input pipeline in the middle of training, after privacy
budget was spent and with TensorFlow's message withheld (it can hold private values). So the
loaders (chexpert.py, mimic_cxr.py, with ``verify_images=True``, their default) run
:func:`check_images` on every file of every split when the table is loaded, and the trainer and
the binaries load every split before any DP plan exists.

What is checked, per file, with the decoder the training pipeline itself uses
(``tf.io.decode_image``, sources.decode_image_file):
  - the file exists and can be read;
  - its bytes start with a JPEG or PNG signature (what the pipeline accepts);
  - it decodes completely (a truncated or corrupt JPEG/PNG fails here, not in training);
  - with ``expected_channels``: the decoded image has that many channels (chest X-rays are
    grayscale: an RGB or RGBA file in such a copy is refused rather than silently converted).
A bad file is reported by row and path with a reason from a fixed list; pixel values and
TensorFlow's own error text are never reported. Decoding runs in a parallel ``tf.data`` pipeline
(``ignore_errors`` drops a failing file, whose row is then re-examined on its own), with a
progress line on the ``tfdpfair.data`` logger every ``progress_every`` files.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

_LOG = logging.getLogger("tfdpfair.data")
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG"
MISSING = "missing or unreadable file"
NOT_AN_IMAGE = "not a JPEG/PNG file"
CORRUPT = "truncated or corrupt image data: the decoder failed"


@dataclasses.dataclass(frozen=True)
class BadImage:
    """One file that failed the check: its row in ``paths``, its path and why (no pixels)."""

    row: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def _decode(row: tf.Tensor, path: tf.Tensor):
    """(row, has JPEG/PNG signature, channels) of one file; any read/decode error drops it."""
    contents = tf.io.read_file(path)
    head = tf.strings.substr(contents, 0, 4)
    signature = tf.logical_or(tf.equal(tf.strings.substr(head, 0, 3), JPEG_MAGIC),
                              tf.equal(head, PNG_MAGIC))
    image = tf.io.decode_image(contents, channels=0, dtype=tf.float32, expand_animations=False)
    return row, signature, tf.shape(image)[-1]


def _reason_for_dropped(path: str) -> str:
    """Why a file dropped by the decoder pipeline failed: read it again on its own."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return MISSING
    if not (head.startswith(JPEG_MAGIC) or head == PNG_MAGIC):
        return NOT_AN_IMAGE
    return CORRUPT


def check_images(paths: Sequence[str], expected_channels: int | None = None,
                 progress_every: int | None = None, what: str = "image files"
                 ) -> list[BadImage]:
    """Decodes every file of ``paths`` once; returns the bad ones (empty list: all good).

    Args:
      paths: image files (JPEG or PNG).
      expected_channels: channels every decoded file must have (1: grayscale), or None.
      progress_every: a progress line every this many files (default: every 10% of the files,
        but at least 500 and at most 10,000 files apart), plus a final line.
      what: how the files are named in the log lines.
    """
    paths = [str(p) for p in paths]
    n = len(paths)
    if n == 0:
        return []
    every = progress_every or min(10_000, max(500, -(-n // 10)))
    start, seen = time.time(), np.zeros(n, bool)
    bad: list[BadImage] = []
    dataset = (tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), paths))
               .map(_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .ignore_errors())
    _LOG.info("checking %d %s (decodable JPEG/PNG%s) before training", n, what,
              f", {expected_channels} channel(s)" if expected_channels else "")
    next_log = every
    for row, signature, channels in dataset.as_numpy_iterator():
        seen[row] = True
        if not signature:
            bad.append(BadImage(int(row), paths[row], NOT_AN_IMAGE))
        elif expected_channels and int(channels) != expected_channels:
            bad.append(BadImage(int(row), paths[row],
                                f"{int(channels)} channels, expected {expected_channels}"))
        if row + 1 >= next_log:
            _LOG.info("checked %d/%d %s (%.0f%%) in %.1f s", row + 1, n, what,
                      100.0 * (row + 1) / n, time.time() - start)
            next_log = row + 1 + every
    bad += [BadImage(int(r), paths[r], _reason_for_dropped(paths[r]))
            for r in np.flatnonzero(~seen)]
    bad.sort(key=lambda b: b.row)
    _LOG.info("checked %d %s in %.1f s: %d bad", n, what, time.time() - start, len(bad))
    return bad
