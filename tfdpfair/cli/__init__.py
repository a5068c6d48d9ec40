"""The absl binaries, installed as console scripts (``python -m tfdpfair.cli.<name>`` works too):

  tfdpfair-train     cli/train.py     DP fine-tuning, baselines, evaluation, report
  tfdpfair-evaluate  cli/evaluate.py  fairness report over run directories
  tfdpfair-audit     cli/audit.py     canary audit or membership inference
  tfdpfair-epsilon   privacy/epsilon_cli.py  ε / σ / steps from the command line

In a clone, ``python -m experiments.<name>`` runs the same binaries (experiments/ holds only
these entry points; nothing in tfdpfair imports it).
"""

from tfdpfair import tf_cpu as _tf_cpu

# Before any binary imports TensorFlow: its oneDNN CPU kernels (tfdpfair/tf_cpu.py), unless the
# user set TF_ENABLE_ONEDNN_OPTS.
ONEDNN = _tf_cpu.prefer_onednn()
