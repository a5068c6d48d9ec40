r"""Fairness evaluation of trained runs: per-group metrics with CIs, private vs non-private.

Reads one or more run directories written by tfdpfair-train (cli/train.py) (see
tfdpfair/fairness/run_io.py for the layout), checks that they share one evaluation set, and
writes into --out_dir:
  fairness.json              every metric per group with bootstrap CIs, disparities, paired
                             private - non-private differences and the verdict sentences
  report.md                  the answer first, then tables
  subgroups.png, privacy_utility.png, disparity_vs_accuracy.png

Example:
  tfdpfair-evaluate \
      --run_dirs=runs/eps1,runs/eps8 --out_dir=runs/fairness \
      --num_bootstrap=1000 --seed=0 --min_group_size=30
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from absl import app, flags, logging

from tfdpfair.fairness import compare, report, run_io
from tfdpfair.fairness import metrics as metrics_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Register the command-line flags. Called only when run as a program, so that importing
    this module (tests, other binaries with a --seed flag) registers nothing."""
    flags.DEFINE_list("run_dirs", None, "Comma-separated run directories.")
    flags.DEFINE_string("out_dir", None, "Where fairness.json, report.md and the PNGs go.")
    flags.DEFINE_integer("num_bootstrap", 1000, "Bootstrap resamples.")
    flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
    flags.DEFINE_integer("min_group_size", 30,
                         "Groups with fewer examples get NaN metrics (reported with count).")
    flags.DEFINE_float("confidence", 0.95, "Confidence level of the CIs.")
    flags.DEFINE_float("threshold", 0.5, "Decision threshold for TPR/FPR (multilabel).")
    flags.DEFINE_list("eval_tasks", None, "Multilabel tasks averaged by macro AUC (default: "
                      "the CheXpert five if present, else all tasks).")
    flags.DEFINE_string("reference", None, "Non-private variant to compare against (default: "
                        "'non_private', else the first non-private variant).")
    flags.mark_flags_as_required(["run_dirs", "out_dir"])


def evaluate(run_dirs: Sequence[str], out_dir: str | pathlib.Path, *, num_bootstrap: int = 1000,
             seed: int = 0, min_group_size: int = 30, confidence: float = 0.95,
             threshold: float = 0.5, eval_tasks: Sequence[str] | None = None,
             reference: str | None = None) -> dict[str, Any]:
    """Evaluate the run directories and write fairness.json, report.md and plots to out_dir.

    Returns the result dict (as written to fairness.json, with NaN for undefined values).
    """
    eval_set, scores, variants = run_io.load_runs(run_dirs)
    config = metrics_lib.MetricConfig(threshold=threshold, min_group_size=min_group_size,
                                      eval_tasks=tuple(eval_tasks) if eval_tasks else None)
    result = compare.evaluate_fairness(eval_set, scores, variants, reference=reference,
                                       num_bootstrap=num_bootstrap, seed=seed,
                                       confidence=confidence, config=config)
    result["run_dirs"] = [str(d) for d in run_dirs]
    result["eval_set_check"] = (
        f"All {len(variants)} variants from {len(run_dirs)} run director"
        f"{'y' if len(run_dirs) == 1 else 'ies'} were evaluated on the same "
        f"{eval_set.num_examples} examples (identical y_true, groups and patient ids).")
    out = pathlib.Path(out_dir)
    run_io.write_json(out / "fairness.json", result)
    written = report.write_report(result, out)
    logging.info("Wrote %s and %s", out / "fairness.json", ", ".join(sorted(written)))
    return result


def main(argv: Sequence[str]) -> None:
    """Run the evaluation from flags; a missing or corrupt run-directory file ends the program
    with a one-line error naming the file and the fix (no traceback)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run_dirs = [d for d in FLAGS.run_dirs if d.strip()]  # "a,b," lists an empty entry
    try:
        result = evaluate(run_dirs, FLAGS.out_dir, num_bootstrap=FLAGS.num_bootstrap,
                          seed=FLAGS.seed, min_group_size=FLAGS.min_group_size,
                          confidence=FLAGS.confidence, threshold=FLAGS.threshold,
                          eval_tasks=FLAGS.eval_tasks, reference=FLAGS.reference)
    except run_io.RunDirError as e:
        raise SystemExit(f"tfdpfair-evaluate: error: {e}") from e
    for comparison in result["comparisons"]:
        for verdict in comparison["verdicts"].values():
            print(verdict["sentence"])


def run() -> None:
    """Console script ``tfdpfair-evaluate``."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
