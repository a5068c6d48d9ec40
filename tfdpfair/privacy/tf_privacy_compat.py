"""The one place that imports TensorFlow Privacy.

``import tensorflow_privacy`` fails on TensorFlow >= 2.16: its package ``__init__`` imports
``tensorflow_estimator``, which no longer exists. Its submodules (the analysis library that
produces the privacy statement, the DP queries) do not need that import. TF Privacy's own
``__init__`` returns early when ``sys.skip_tf_privacy_import`` is set, so we set that flag and
import submodules directly. Everything else in tfdpfair goes through this module, and
tests/test_tf_privacy_compat.py checks that it keeps working.
"""

from __future__ import annotations

import importlib
import sys
import types

STATEMENT_MODULE = "tensorflow_privacy.privacy.analysis.compute_dp_sgd_privacy_lib"


def import_tf_privacy_submodule(name: str) -> types.ModuleType:
    """Imports ``tensorflow_privacy.<...>`` without running the broken package __init__."""
    if not name.startswith("tensorflow_privacy."):
        raise ValueError(f"expected a tensorflow_privacy submodule, got {name!r}.")
    sys.skip_tf_privacy_import = True  # read by tensorflow_privacy/__init__.py
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"could not import {name} ({err}). tensorflow-privacy must be installed without its "
            "pinned dependencies: `pip install --no-deps tensorflow-privacy==0.9.0` "
            "(the Makefile does this).") from err


def tf_privacy_statement(
    num_examples: int,
    batch_size: int,
    num_epochs: float,
    noise_multiplier: float,
    delta: float,
) -> str:
    """TF Privacy's own DP-SGD privacy statement (RDP), as an independent cross-check.

    TF Privacy reports two numbers: ε for an arbitrary data order and ε "assuming Poisson
    sampling". tfdpfair really does Poisson sampling, so the second one is the one that applies
    to our runs (computed with RDP, add-or-remove-one adjacency).
    """
    lib = import_tf_privacy_submodule(STATEMENT_MODULE)
    return lib.compute_dp_sgd_privacy_statement(
        number_of_examples=int(num_examples),
        batch_size=int(batch_size),
        num_epochs=float(num_epochs),
        noise_multiplier=float(noise_multiplier),
        delta=float(delta),
        used_microbatching=False,
    )
