"""Test callbacks that interrupt DPModel.fit at a given logical step."""

import keras


class StopAtStep(keras.callbacks.Callback):
    """Stops fit() (``crash=False``) or raises KeyboardInterrupt, simulating a pre-emption
    (``crash=True``), once the logged ``logical_steps`` reaches ``step``."""

    def __init__(self, step: int, crash: bool = False):
        super().__init__()
        self.step, self.crash = step, crash

    def on_train_batch_end(self, batch, logs=None):
        if logs["logical_steps"] >= self.step:
            if self.crash:
                raise KeyboardInterrupt("pre-empted")
            self.model.stop_training = True
