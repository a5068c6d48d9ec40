"""Packaging for tfdpfair: DP-SGD fine-tuning with exact accounting and fairness evaluation.

tensorflow-privacy 0.9.0 (its last release) pins tensorflow-estimator, numpy<2 and
dp-accounting==0.4.3, none of which can coexist with TensorFlow 2.21. We only use its pure-Python
analysis submodules, so the Makefile installs it with ``--no-deps`` after this package
(see TF_PRIVACY_REQUIREMENT and tfdpfair/privacy/tf_privacy_compat.py).
"""

from setuptools import find_packages, setup

TF_PRIVACY_REQUIREMENT = "tensorflow-privacy==0.9.0"  # installed --no-deps by the Makefile

INSTALL_REQUIRES = [
    "tensorflow==2.21.*",
    # TensorFlow 2.21 does not install TensorBoard, which keras.callbacks.TensorBoard needs;
    # TensorBoard is released in step with TensorFlow (2.21.x for 2.21).
    "tensorboard==2.21.*",
    "keras>=3.12,<4",
    "dp-accounting>=0.6,<0.7",
    "tensorflow-datasets>=4.9.10,<5",
    "absl-py>=2.1",
    "ml-collections>=1.0",
    "numpy>=1.26",
    "scipy>=1.11",
    "scikit-learn>=1.5",
    "matplotlib>=3.8",
    "pandas>=2.1",
    "pillow>=10",
    "openpyxl>=3.1",
]

# The published NFNet checkpoints (F{n}_haiku.npz) are dill pickles: reading them with
# allow_pickle=True needs dill (tfdpfair.models.pretrained); pip picks a dill release that
# supports the running Python.
CHECKPOINTS_REQUIRES = [
    "dill>=0.3.6,<0.5",
]

# Profiling tools for the benchmarks (``make bench-install``; never part of the base install or
# of ``make test``): memray for native allocation traces of a step (benchmarks/ghost_memory.py
# --memray), tensorboard-plugin-profile (XProf) to read TF profiler traces (tf.profiler).
BENCH_REQUIRES = [
    "memray>=1.11",
    "tensorboard-plugin-profile>=2.18",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "fairlearn>=0.12",
    "wheel>=0.40",  # tests/test_wheel.py builds the wheel without build isolation
    *CHECKPOINTS_REQUIRES,  # the pickled-checkpoint tests
]

setup(
    name="tfdpfair",
    version="0.1.0",
    description=(
        "Differentially private (DP-SGD) fine-tuning of pre-trained image classifiers in "
        "TensorFlow/Keras 3, with exact privacy accounting and subgroup fairness evaluation."
    ),
    # The Pythons TensorFlow 2.21 supports (its classifiers and wheels: 3.10 to 3.13). CI here
    # runs 3.11 only (README).
    python_requires=">=3.10,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    # experiments/ (python -m entry points in a clone) is not installed: a top-level package of
    # that name would clash with other projects'; the configs ship as tfdpfair.configs.
    packages=find_packages(include=["tfdpfair", "tfdpfair.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": TEST_REQUIRES,
        "checkpoints": CHECKPOINTS_REQUIRES,
        "bench": BENCH_REQUIRES,
        "tfprivacy": [TF_PRIVACY_REQUIREMENT],
    },
    entry_points={
        "console_scripts": [
            "tfdpfair-epsilon=tfdpfair.privacy.epsilon_cli:run",
            "tfdpfair-train=tfdpfair.cli.train:run",
            "tfdpfair-evaluate=tfdpfair.cli.evaluate:run",
            "tfdpfair-audit=tfdpfair.cli.audit:run",
        ],
    },
)
