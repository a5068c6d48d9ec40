"""`python -m experiments.audit` in a clone: the `tfdpfair-audit` binary (tfdpfair/cli/audit.py)."""

from tfdpfair.cli.audit import run

if __name__ == "__main__":
    run()
