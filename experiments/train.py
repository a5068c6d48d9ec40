"""`python -m experiments.train` in a clone: the `tfdpfair-train` binary (tfdpfair/cli/train.py)."""

from tfdpfair.cli.train import run

if __name__ == "__main__":
    run()
