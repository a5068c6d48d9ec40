"""tfdpfair.audit: empirical privacy audits of a DP training run.

Modules (numpy/scipy unless noted; TensorFlow only where scores are produced):
  epsilon_lower_bound  the one-run audit (Steinke, Nasr & Jagielski 2023): canary scores and
                       membership bits -> (r, v, ε lower bound at 95% confidence)
  fdp_lower_bound      the f-DP one-run audit for Gaussian trade-off curves (Mahloujifar,
                       Melis & Chaudhuri 2025): the same guesses -> μ lower bound and its ε at δ
  scores               white-box canary scores from the released updates' projections
  canaries             (TF) gradient canaries injected into DPModel, and the projection recorder
  dirac                (TF) Dirac canaries: one coordinate each in CanarySlots no example
                       touches; last-iterate and all-steps scores, both bounds
  input_canaries       (TF) black-box canaries: mislabelled examples, scored by their loss
  losses               (TF) per-example losses of a Keras model (the membership score producer;
                       the run's own loss for the trainer's tasks)
  run_membership       (TF) a finished run's members and non-members with subgroups, read from
                       its config through the trainer's task data; refusals; scoring
  membership           loss-threshold membership inference, overall and per subgroup, with
                       bootstrap CIs (tfdpfair.fairness.bootstrap)
  report               audit.md section and plots (matplotlib)
Submodules are not imported here, so the numpy core does not load TensorFlow.
"""
