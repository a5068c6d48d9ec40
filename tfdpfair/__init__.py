"""tfdpfair: DP-SGD fine-tuning with exact accounting and subgroup fairness evaluation.

The Keras entry points are imported lazily, so ``import tfdpfair.fairness`` (numpy only) does
not load TensorFlow. ``import tfdpfair`` still makes every tfdpfair Keras class loadable by
``keras.models.load_model`` (stand-ins registered once Keras is imported: _keras_registration.py).
"""

from __future__ import annotations

import importlib
from typing import Any

from tfdpfair import _keras_registration

__version__ = "0.1.0"

_LAZY = {
    "make_private": "tfdpfair.training.dp_model",
    "DPModel": "tfdpfair.training.dp_model",
    "DPOptimizer": "tfdpfair.training.custom_loop",
    "PrivacyBudgetExhaustedError": "tfdpfair.training.dp_model",
    "DPConfig": "tfdpfair.privacy.dp_sgd",
    "PrivacyPlan": "tfdpfair.privacy.accounting",
    "plan_dp_sgd": "tfdpfair.privacy.accounting",
    "compute_epsilon": "tfdpfair.privacy.accounting",
    "calibrate_noise_multiplier": "tfdpfair.privacy.accounting",
    "prefer_onednn": "tfdpfair.tf_cpu",
}

__all__ = sorted(_LAZY)

_keras_registration.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tfdpfair' has no attribute {name!r}")
