"""``import tfdpfair`` registers every Keras-serializable class of the library (issue 19 case 6),
whatever the import order, while ``import tfdpfair`` alone stays free of TensorFlow.

Each scenario runs in a fresh interpreter that imports only what the scenario names, so nothing
this test process imported can register the classes behind the loader's back.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from step_callbacks import StopAtStep

import tfdpfair
from tfdpfair.models.layers import ScaledActivation, WSConv2D

REPO = pathlib.Path(__file__).resolve().parents[1]

LOAD = """
import json, sys
{imports}
m = keras.models.load_model(sys.argv[1])
inner_types = sorted({{type(l).__name__ for l in m.inner.layers}})
print(json.dumps({{"type": type(m).__name__, "module": type(m).__module__,
                  "steps": int(m.logical_steps_done), "plan": repr(m.plan),
                  "epsilon": m.epsilon_spent(), "inner_types": inner_types}}))
"""


def _run(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def resume_file(tmp_path_factory):
    """A resume file written by ``dp.save`` after make_private, compile and fit (7 steps)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6, 6, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 1)), WSConv2D(4, 3, name="conv"),
                              ScaledActivation("relu", name="act"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, name="head")])
    dp = tfdpfair.make_private(model, tfdpfair.DPConfig(
        expected_batch_size=30, micro_batch_size=15, noise_multiplier=1.0, delta=1e-3,
        clipping="vectorized"))  # ghost + WSConv2D on 1 channel fails here: reported
    dp.compile(optimizer=keras.optimizers.SGD(0.1),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dp.fit(x, y, steps=12, verbose=0, callbacks=[StopAtStep(7)])
    path = tmp_path_factory.mktemp("resume") / "resume.keras"
    dp.save(path)
    return path, {"steps": 7, "plan": repr(dp.plan), "epsilon": dp.epsilon_spent()}


@pytest.mark.parametrize("imports", [
    "import tfdpfair\nimport keras",
    "import keras\nimport tfdpfair",
    "import tfdpfair\nimport tensorflow as tf\nimport keras",  # tensorflow imports keras
    "import tfdpfair\nimport tfdpfair.models.nfnet\nimport keras",  # keras loads inside ours
], ids=["tfdpfair_first", "keras_first", "tensorflow_first", "inside_tfdpfair_module"])
def test_load_model_after_only_import_tfdpfair(resume_file, imports):
    path, expected = resume_file
    got = json.loads(_run(LOAD.format(imports=imports), str(path)))
    assert got["type"] == "DPModel" and got["module"] == "tfdpfair.training.dp_model"
    assert got["steps"] == expected["steps"] and got["plan"] == expected["plan"]
    assert got["epsilon"] == pytest.approx(expected["epsilon"], rel=1e-12)
    assert {"WSConv2D", "ScaledActivation"} <= set(got["inner_types"])


@pytest.mark.parametrize("module", ["tfdpfair", "tfdpfair.fairness"])
def test_import_does_not_load_tensorflow_or_keras(module):
    out = _run(f"import sys, {module}\n"
               "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    assert out == "[]"


def test_import_tfdpfair_then_keras_does_not_import_tfdpfair_training():
    """The hook registers stand-ins only; the real modules load when a file needs them."""
    out = _run("import sys, tfdpfair, keras\n"
               "from tfdpfair import _keras_registration as r\n"
               "print(keras.saving.get_registered_object('tfdpfair>DPModel') is not None,"
               " 'tfdpfair.training.dp_model' in sys.modules,"
               " type(keras.__loader__).__name__, type(keras.__spec__.loader).__name__,"
               " any(isinstance(f, r._KerasImportHook) for f in sys.meta_path))")
    # the hook is gone and keras's own loader restored
    assert out == "True False SourceFileLoader SourceFileLoader False"


def test_registry_table_lists_every_serializable_class():
    """The stand-in table matches what the modules register (a new class must be added)."""
    import tfdpfair.models.nfnet  # noqa: F401  (imports layers too)
    import tfdpfair.models.wide_resnet  # noqa: F401
    import tfdpfair.training.averaging  # noqa: F401
    import tfdpfair.training.dp_model  # noqa: F401
    import tfdpfair.training.dp_state  # noqa: F401
    from tfdpfair import _keras_registration

    registered = {name: obj for name, obj in keras.saving.get_custom_objects().items()
                  if name.startswith("tfdpfair>")}
    table = _keras_registration.REGISTERED_CLASSES
    assert set(registered) == set(table)
    for name, obj in registered.items():
        assert isinstance(obj, type) and obj.__module__ == table[name], name


def test_every_module_that_registers_is_in_the_table():
    from tfdpfair import _keras_registration

    registering = {".".join(p.relative_to(REPO).with_suffix("").parts)
                   for p in (REPO / "tfdpfair").rglob("*.py")
                   if "register_keras_serializable" in p.read_text()}
    registering.discard("tfdpfair._keras_registration")
    assert registering == set(_keras_registration.REGISTERED_CLASSES.values())
