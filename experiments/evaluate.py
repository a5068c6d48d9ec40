"""`python -m experiments.evaluate` in a clone: the `tfdpfair-evaluate` binary (tfdpfair/cli/evaluate.py)."""

from tfdpfair.cli.evaluate import run

if __name__ == "__main__":
    run()
