"""tfdpfair.fairness: subgroup metrics with bootstrap CIs, private vs non-private comparison.

Modules (numpy only, except report.py which uses matplotlib's Agg canvas):
  metrics    per-group metrics (accuracy, per-class accuracy, AUC, macro AUC, TPR/FPR) and
             disparity aggregates, on weighted examples
  bootstrap  seeded example / patient (cluster) bootstrap shared by all models (paired)
  compare    evaluate_fairness: per-model summaries and paired private − non-private comparisons
  run_io     run-directory writer (for tfdpfair-train) and reader
  report     report.md and PNG plots
Submodules are not imported here, so `import tfdpfair.fairness.metrics` stays light.
"""
