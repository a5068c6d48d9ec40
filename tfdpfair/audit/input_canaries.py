"""Black-box input canaries for the one-run audit: mislabelled examples (TF only in scoring).

m canary examples (x_j, y'_j), drawn from data outside the training set, each with a wrong label
y'_j ≠ y_j chosen uniformly (seeded). Canary j is included with probability ½ (recorded bits):
:meth:`InputCanaries.training_set` appends the included ones to the private training set, and
they are then sampled, clipped and noised like any example (the run is accounted for the
enlarged N). After training, the score of canary j is −loss(final model, (x_j, y'_j)): a
memorised wrong label has a low loss. Only the final model is used (black box), so the bound is
weaker than with gradient canaries (canaries.py); it audits the whole pipeline, inputs included.

>>> import numpy as np
>>> c = InputCanaries(np.zeros((4, 2), np.float32), np.array([0, 1, 2, 3]), num_classes=4, seed=0)
>>> bool((c.labels != np.array([0, 1, 2, 3])).all())
True
"""

from __future__ import annotations

import numpy as np


class InputCanaries:
    """Mislabelled canary examples with ½-inclusion bits (module docstring).

    Attributes:
      x, labels: the m canary inputs and their (wrong) training labels.
      included: bool [m], the secret membership bits.
    """

    def __init__(self, x: np.ndarray, true_labels: np.ndarray, num_classes: int, seed: int,
                 inclusion_probability: float = 0.5):
        if num_classes < 2:
            raise ValueError(f"mislabelling needs num_classes >= 2, got {num_classes}.")
        rng = np.random.default_rng(seed)
        true_labels = np.asarray(true_labels).astype(np.int64)
        shift = rng.integers(1, num_classes, size=len(true_labels))  # never 0: always wrong
        self.x = np.asarray(x)
        self.labels = ((true_labels + shift) % num_classes).astype(np.int32)
        self.included = rng.random(len(true_labels)) < inclusion_probability

    @property
    def num_canaries(self) -> int:
        return len(self.labels)

    def training_set(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The private set with the included canaries appended (N + #included examples)."""
        return (np.concatenate([x, self.x[self.included]]).astype(x.dtype),
                np.concatenate([y, self.labels[self.included]]).astype(y.dtype))

    def scores(self, model, from_logits: bool = True) -> np.ndarray:
        """−loss of every canary under its wrong label on ``model`` (higher = "included")."""
        from tfdpfair.audit.losses import per_example_losses
        return -per_example_losses(model, self.x, self.labels, from_logits=from_logits)
