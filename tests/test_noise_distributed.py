"""Noise under tf.distribute: every replica draws the same noise for a step, so a replicated
update adds exactly one N(0, σ²C²) draw (DESIGN.md invariant 2 across replicas).

Runs in a subprocess because logical CPU devices must be configured before TF starts."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfdpfair.privacy import noise
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    like = [tf.zeros([20000])]

    @tf.function
    def draw(step):
        seed = noise.step_seed(1234, step)
        return noise.gaussian_noise_like(like, 1.0, seed)[0]

    per_replica = strategy.run(draw, args=(tf.constant(3, tf.int64),))
    values = [v.numpy() for v in strategy.experimental_local_results(per_replica)]
    print(json.dumps({"replicas": len(values),
                      "identical": bool(np.array_equal(values[0], values[1])),
                      "std": float(values[0].std())}))
""")


def test_replicas_draw_identical_noise():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["identical"]
    assert abs(out["std"] - 1.0) < 0.03
