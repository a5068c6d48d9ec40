"""Which callbacks may see the un-noised training statistics (``nonprivate_*`` logs).

``nonprivate_loss``, ``nonprivate_clipped_fraction``, compiled training metrics and the count of
non-finite examples are computed from private data without noise. Shown to a person or written
to a log they are monitoring; *acted on* (stop training, change the learning rate, pick weights,
anything a callback's code may decide) they are a release that no accountant counts.

So DPModel.fit hands the full logs only to callbacks that display or record them: Keras's
ProgbarLogger, History, TensorBoard and CSVLogger (exact classes: a subclass may act), and any
callback the user marks with :func:`allow_nonprivate_logs`. Every other callback is wrapped in
:class:`PublicLogsOnly` and receives the logs without the ``nonprivate_*`` keys (ε, logical
steps and ``val_*`` metrics on held-out data stay).
"""

from __future__ import annotations

from typing import Iterable

import keras

NONPRIVATE_PREFIX = "nonprivate_"
DISPLAY_OR_RECORD = (keras.callbacks.ProgbarLogger, keras.callbacks.History,
                     keras.callbacks.TensorBoard, keras.callbacks.CSVLogger)
_OPT_IN_ATTRIBUTE = "_tfdpfair_receives_nonprivate_logs"
_HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
          "on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end",
          "on_test_begin", "on_test_end", "on_test_batch_begin", "on_test_batch_end",
          "on_predict_begin", "on_predict_end", "on_predict_batch_begin",
          "on_predict_batch_end")


def allow_nonprivate_logs(callback: keras.callbacks.Callback) -> keras.callbacks.Callback:
    """Marks ``callback`` as one that only displays or records ``nonprivate_*`` values.

    The caller takes responsibility that it never acts on them (no stopping, no learning-rate
    change, no choice of weights): such a decision would be an un-accounted release. Returns
    the callback, so it can wrap the constructor call.
    """
    setattr(callback, _OPT_IN_ATTRIBUTE, True)
    return callback


def receives_nonprivate_logs(callback: keras.callbacks.Callback) -> bool:
    return type(callback) in DISPLAY_OR_RECORD or bool(
        getattr(callback, _OPT_IN_ATTRIBUTE, False))


def public_logs(logs: dict | None) -> dict | None:
    """``logs`` without the un-noised ``nonprivate_*`` entries."""
    if logs is None:
        return None
    return {k: v for k, v in logs.items() if not str(k).startswith(NONPRIVATE_PREFIX)}


class PublicLogsOnly(keras.callbacks.Callback):
    """Forwards every hook to ``callback`` with :func:`public_logs` of the logs."""

    def __init__(self, callback: keras.callbacks.Callback):
        super().__init__()
        self.callback = callback
        for hook in _HOOKS:
            setattr(self, hook, self._forward(getattr(callback, hook), hook))

    @staticmethod
    def _forward(method, hook: str):
        if hook.endswith(("_train_begin", "_train_end", "_test_begin", "_test_end",
                          "_predict_begin", "_predict_end")):
            def forward_run(logs=None):
                return method(logs=public_logs(logs))
            return forward_run

        def forward_indexed(index, logs=None):  # batch or epoch hooks
            return method(index, logs=public_logs(logs))
        return forward_indexed

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)


def public_logs_only(callbacks: Iterable[keras.callbacks.Callback]
                     ) -> list[keras.callbacks.Callback]:
    """The callbacks as DPModel.fit runs them: non-displaying ones see public logs only."""
    return [c if receives_nonprivate_logs(c) else PublicLogsOnly(c) for c in callbacks]
