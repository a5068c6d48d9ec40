"""Entry points only: ``python -m experiments.{train,evaluate,audit}`` in a clone run the
console scripts of tfdpfair/cli/. Not installed; nothing in tfdpfair imports it. The configs
ship with the package (tfdpfair/configs/)."""
