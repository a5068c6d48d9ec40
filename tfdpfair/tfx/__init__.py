"""TFX integration: a Trainer ``module_file`` (trainer_module.run_fn) and the serving export.

TFX itself is not imported anywhere here: the Trainer contract of TFX 1.21 (TF 2.21) is followed
duck-typed (``fn_args`` is any object with the FnArgs attributes), so this package works, and is
tested, without TFX installed.

  config.py          custom_config keys -> TFXTrainerConfig (validated, unknown keys refused)
  examples.py        gzipped TFRecords of tf.Example -> in-graph decode/preprocess, counting,
                     in-memory materialisation for DP-SGD (refused beyond a memory limit)
  export.py          export_serving: SavedModel (serving_default on serialized tf.Examples,
                     serving_images on image tensors) + privacy_statement.json + model_card.md
  model_card.py      the model card and the fairness summary
  trainer_module.py  run_fn(fn_args)
"""
