"""Experiment configs (ml_collections ``get_config(arg)`` files), shipped with the package.

The binaries take ``--config=<file>[:arg]`` or a config's name, e.g. ``--config=demo`` or
``--config=chexpert_nfnet_f0:runlocal=True`` (tfdpfair/cli/config_path.py).
"""
