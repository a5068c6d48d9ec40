"""Cross-host agreement for DP runs under tf.distribute.

* :func:`broadcast_from_chief`: the secret seeds are drawn once, from OS entropy, and every host
  uses the chief's (replica 0's). Each process drawing its own would sample different Poisson
  batches and add independent noise on every host (√hosts too much noise, wrong accounting).
* :func:`check_hosts_agree`: before the first step, every host must agree on the values that
  decide the step loop (N, the plan, the start step, the micro-batch size); a mismatch would
  otherwise hang a collective or mix different runs. It fails fast with a clear error instead.

Both are SUM all-reduces over the strategy's replicas (the only integer reduction every
cross-device implementation offers: ``tf.distribute.ReduceOp`` has no MAX or MIN): a broadcast is
the SUM of values only replica 0 contributes; agreement is the SUM of per-replica "differs from
replica 0" flags. They work the same under Mirrored, MultiWorker and TPU strategies and are no-ops
without a strategy. Values are int64 (62-bit seeds keep all their entropy).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def _multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return bool(getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)())


def _all_reduce(strategy: tf.distribute.Strategy, values: np.ndarray, compare: bool = False
                ) -> np.ndarray:
    """SUM all-reduce over all replicas of replica 0's int64 vector ``values`` (a broadcast).

    With ``compare``, each replica instead contributes 1 per entry where its own ``values``
    differ from replica 0's: the result counts the disagreeing replicas per entry.
    """
    values = tf.constant(np.asarray(values, np.int64))

    def replica_fn(v):
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        chief = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                   tf.where(first, v, tf.zeros_like(v)))
        if not compare:
            return chief
        return context.all_reduce(tf.distribute.ReduceOp.SUM,
                                  tf.cast(tf.not_equal(v, chief), tf.int64))

    result = tf.function(lambda: strategy.run(replica_fn, args=(values,)))()
    return strategy.experimental_local_results(result)[0].numpy()


def broadcast_from_chief(strategy: tf.distribute.Strategy, seeds: dict[str, int]
                         ) -> dict[str, int]:
    """Every host's copy of the chief's (replica 0's) ``seeds``."""
    if not _multi_worker(strategy):
        return dict(seeds)  # one process: its draw is already the only one
    keys = sorted(seeds)
    values = _all_reduce(strategy, np.array([seeds[k] for k in keys]))
    return {k: int(v) for k, v in zip(keys, values)}


def check_hosts_agree(strategy: tf.distribute.Strategy, fingerprint: dict[str, int]) -> None:
    """Raises on every host unless all hosts hold the same ``fingerprint`` values."""
    if not _multi_worker(strategy):
        return
    keys = sorted(fingerprint)
    values = np.array([int(fingerprint[k]) for k in keys])
    disagreeing = _all_reduce(strategy, values, compare=True)
    differ = [k for k, count in zip(keys, disagreeing) if count > 0]
    if differ:
        raise RuntimeError(
            f"the hosts of this DP run disagree on {', '.join(differ)}: every host must train "
            "on the same dataset (same N and order) with the same plan and restored state, or "
            "the hosts would sample different steps. Check that every worker loads the same "
            "data and the same checkpoint.")
