"""Loss-threshold membership inference per subgroup on the demo digits (audit/membership.py),
checked against scikit-learn's ROC functions on the same scores; input canaries' bits."""

import doctest

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from tfdpfair.audit import input_canaries, membership
from tfdpfair.audit.losses import per_example_losses
from tfdpfair.data.demo import load_demo_data


def sklearn_metrics(is_member, scores, fprs=(0.001, 0.01)):
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    return ([roc_auc_score(is_member, scores), np.max(tpr - fpr)]
            + [tpr[fpr <= x].max() for x in fprs])


@pytest.fixture(scope="module")
def demo_scores():
    data = load_demo_data(public_fraction=0.15, test_fraction=0.2)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    flat = lambda split: split.images.reshape(len(split), -1)
    model.fit(flat(data.private), data.private.labels, epochs=40, batch_size=64, verbose=0)
    losses = np.concatenate([per_example_losses(model, flat(data.private), data.private.labels),
                             per_example_losses(model, flat(data.test), data.test.labels)])
    is_member = np.r_[np.ones(len(data.private)), np.zeros(len(data.test))].astype(int)
    ink = np.concatenate([data.private.groups["ink"], data.test.groups["ink"]])
    return -losses, is_member, ink


def test_membership_by_subgroup_matches_sklearn(demo_scores):
    scores, is_member, ink = demo_scores
    result = membership.membership_inference(scores, is_member, {"ink": ink},
                                             num_resamples=100, seed=0)
    names = result["metrics"]
    assert names == ["auc", "advantage", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01"]
    slices = [("overall", result["overall"], np.ones(len(scores), bool))]
    slices += [(g, result["by_group"]["ink"][g], ink == g) for g in ("light", "medium", "heavy")]
    for name, stats, index in slices:
        expected = sklearn_metrics(is_member[index], scores[index])
        for metric, value in zip(names, expected):
            stat = stats[metric]
            assert np.isfinite([stat["value"], stat["ci_low"], stat["ci_high"]]).all(), name
            assert stat["value"] == pytest.approx(value, abs=1e-12), (name, metric)
            assert stat["ci_low"] <= stat["ci_high"]
        assert 0.5 < stats["auc"]["value"] < 1.0  # a non-private model leaks membership a bit
        assert stats["auc"]["ci_low"] <= stats["auc"]["value"] <= stats["auc"]["ci_high"]
    counts = result["counts"]["ink"]
    assert sum(c["members"] for c in counts.values()) == is_member.sum()


def test_ties_and_bootstrap_rows_agree_with_sklearn_on_resampled_data():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    is_member = (rng.random(300) < 0.6).astype(int)
    counts = rng.multinomial(300, np.full(300, 1 / 300), size=3)
    got = membership.attack_metrics(scores, is_member, counts)
    for row, c in zip(got, counts):
        index = np.repeat(np.arange(300), c)
        np.testing.assert_allclose(row, sklearn_metrics(is_member[index], scores[index]),
                                   atol=1e-12)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        membership.membership_inference(np.array([np.nan, 1.0]), np.array([1, 0]))
    with pytest.raises(ValueError, match="labels"):
        membership.membership_inference(np.zeros(3), np.array([1, 0, 1]), {"g": np.array(["a"])})


def test_input_canaries_are_mislabelled_and_half_included():
    x = np.arange(400, dtype=np.float32).reshape(200, 2)
    true = np.arange(200) % 10
    c = input_canaries.InputCanaries(x, true, num_classes=10, seed=3)
    assert (c.labels != true).all()
    assert 70 < c.included.sum() < 130
    xt, yt = c.training_set(np.zeros((5, 2), np.float32), np.zeros(5, np.int32))
    assert len(xt) == 5 + c.included.sum()
    np.testing.assert_array_equal(yt[5:], c.labels[c.included])


def test_docstring_examples_run():
    assert doctest.testmod(membership).failed == 0
    assert doctest.testmod(input_canaries).failed == 0
