"""tfdpfair.trainer: the experiment runner behind the binaries (big_vision's "train.py" layer).

  runner         train_and_evaluate(config, workdir): data -> model -> optimizer -> restore ->
                 DP loop (tfdpfair.training.DPModel.fit) -> evaluation -> report
  task_data      the data registry (digits, CheXpert, MIMIC-CXR, TFDS) -> TaskData
  registries     model (tfdpfair.models.registry), optimizer, schedule and loss registries
  callbacks      checkpoint / progress / periodic-evaluation callbacks, pre-emption
  workdir        workdir layout, config.json, resume rules
  metric_writer  metrics.jsonl + TensorBoard (nonprivate/ tags)
  report         report.md, predictions and metrics for tfdpfair-evaluate

The DP Keras core it drives lives in tfdpfair.training; nothing there imports this package.
"""
