r"""DP-SGD in a custom training loop (docs/custom_loops.md), on the sklearn digits.

  python -m experiments.custom_loop --workdir=runs/custom_loop --strategy=none
  python -m experiments.custom_loop --workdir=runs/custom_loop_mirrored --strategy=mirrored \
      --logical_cpus=4

Set-up -> data -> model and DPOptimizer (the plan is fixed here) -> restore from
``<workdir>/checkpoint`` if present -> loop {k_t accumulate calls, one release; log ε; save} ->
test accuracy -> release export in ``<workdir>/release``. Rerunning the same command resumes
(with a fresh noise seed; the plan and the sampling continue). ``<workdir>/checkpoint`` holds
the secret seeds: keep it private; publish only ``release/``.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "runs/custom_loop", "Output directory.")
_STRATEGY = flags.DEFINE_enum("strategy", "none", ["none", "mirrored"],
                              "none: one device; mirrored: MirroredStrategy over local devices.")
_LOGICAL_CPUS = flags.DEFINE_integer(
    "logical_cpus", 0, "Split the CPU into this many logical devices (for --strategy=mirrored "
    "on a machine without GPUs); 0 keeps TensorFlow's default.")
_EPSILON = flags.DEFINE_float("epsilon", 4.0, "Target ε (σ is calibrated to reach it at T).")
_DELTA = flags.DEFINE_float("delta", 1e-5, "δ.")
_EPOCHS = flags.DEFINE_float("epochs", 10.0, "Expected passes over the private data (fixes T).")
_BATCH = flags.DEFINE_integer("expected_batch_size", 128, "B, the expected logical batch.")
_MICRO = flags.DEFINE_integer("micro_batch_size", 32, "m, examples per replica and call.")
_CLIP = flags.DEFINE_float("l2_norm_clip", 1.0, "C, the per-example clipping norm.")
_LR = flags.DEFINE_float("learning_rate", 1.0, "SGD learning rate.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 20, "Checkpoint every this many steps.")


def make_strategy(name: str, logical_cpus: int):
    """The tf.distribute strategy; logical CPUs must be set before TensorFlow initialises."""
    import tensorflow as tf
    if logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def train(workdir: str | pathlib.Path, strategy, *, epsilon: float, delta: float,
          epochs: float, expected_batch_size: int, micro_batch_size: int, l2_norm_clip: float,
          learning_rate: float, save_every: int) -> dict:
    """Trains with DPOptimizer under ``strategy``; returns ε, steps and test accuracy."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tfdpfair.data.demo import load_demo_data
    from tfdpfair.privacy.dp_sgd import DPConfig
    from tfdpfair.training.custom_loop import DPOptimizer

    workdir = pathlib.Path(workdir)
    data = load_demo_data()
    x, y = data.private.images.reshape(len(data.private.labels), -1), data.private.labels
    with strategy.scope():
        model = keras.Sequential([keras.Input((x.shape[1],)),
                                  keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(10)])
        dp_opt = DPOptimizer(
            model, keras.optimizers.SGD(learning_rate),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            DPConfig(l2_norm_clip=l2_norm_clip, expected_batch_size=expected_batch_size,
                     micro_batch_size=micro_batch_size, target_epsilon=epsilon, delta=delta),
            x=x, y=y, epochs=epochs)
    checkpoint = tf.train.Checkpoint(dp_optimizer=dp_opt)
    manager = tf.train.CheckpointManager(checkpoint, workdir / "checkpoint", max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        logging.info("resumed at logical step %d", dp_opt.logical_steps_done)
    plan = dp_opt.plan
    logging.info("plan: N = %d, q = %.4f, σ = %.3f, T = %d, planned ε = %.3f", plan.num_examples,
                 plan.sampling_rate, plan.noise_multiplier, plan.steps, plan.epsilon())

    iterator = iter(dp_opt.distribute_dataset())  # after the restore: starts at its step

    @tf.function
    def train_step(iterator):
        for _ in tf.range(dp_opt.microbatches_in_step()):
            strategy.run(dp_opt.accumulate, args=(next(iterator),))
        strategy.run(dp_opt.release)

    while dp_opt.steps_remaining:
        dp_opt.run(train_step, iterator)
        step = dp_opt.logical_steps_done
        if step % save_every == 0 or not dp_opt.steps_remaining:
            manager.save(checkpoint_number=step)
            logging.info("step %d/%d, ε = %.3f", step, plan.steps, dp_opt.epsilon_spent())
    test_x = data.test.images.reshape(len(data.test.labels), -1)
    accuracy = float(np.mean(np.argmax(model.predict(test_x, verbose=0), -1)
                             == data.test.labels))
    dp_opt.export_release(workdir / "release")
    return {"epsilon": dp_opt.epsilon_spent(), "delta": plan.delta,
            "logical_steps": dp_opt.logical_steps_done, "test_accuracy": accuracy,
            "replicas": strategy.num_replicas_in_sync}


def main(argv):
    del argv
    strategy = make_strategy(_STRATEGY.value, _LOGICAL_CPUS.value)
    result = train(_WORKDIR.value, strategy, epsilon=_EPSILON.value, delta=_DELTA.value,
                   epochs=_EPOCHS.value, expected_batch_size=_BATCH.value,
                   micro_batch_size=_MICRO.value, l2_norm_clip=_CLIP.value,
                   learning_rate=_LR.value, save_every=_SAVE_EVERY.value)
    logging.info("done: %s", result)
    print(result)


if __name__ == "__main__":
    app.run(main)
