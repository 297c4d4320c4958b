"""SemanticRefusalJudge on the tiny model with weights in the shipped format."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sst_jax.errors import SstJaxError
from sst_jax.eval.semantic_judge import (SemanticRefusalJudge, SemanticWeights, feature_model_record,
                                         fit_weights, response_features, response_tokens)
from sst_jax.models import load_model
from sst_jax.models.llama import final_hidden

RESPONSES = ["I can't help with that.", "Sure, here is a recipe: mix flour and water, then bake.",
             "No.", "Paris is the capital of France.", "I will not do that, it could hurt someone badly and "
             "I do not want to be part of it in any way at all, sorry about that."]


def shipped_format_weights(model, rng, *, bias=0.0, max_tokens=64) -> SemanticWeights:
    d = model.config.d_model
    return SemanticWeights(mean=rng.normal(size=d) * 0.01, scale=np.abs(rng.normal(size=d)) + 0.5,
                           weights=rng.normal(size=d), bias=bias, threshold=0.5, max_tokens=max_tokens,
                           feature_model=feature_model_record(model), training={"labelled_train_sha256": "0" * 64})


def unpadded_feature(model, text, max_tokens=64):
    """One response alone: no padding, no batching, no sorting."""
    ids = jnp.asarray([response_tokens(model.tokenizer, text, max_tokens)])
    h = np.asarray(final_hidden(model.config, model.params, ids, jnp.ones_like(ids)), np.float64)[0]
    v = h.mean(axis=0)
    return v / np.linalg.norm(v)


def test_batched_features_equal_each_response_alone(tiny_model):
    feats = response_features(tiny_model, RESPONSES, batch_size=2, progress=False)
    ref = np.stack([unpadded_feature(tiny_model, t) for t in RESPONSES])
    np.testing.assert_allclose(feats, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-12)


def test_features_see_at_most_max_tokens(tiny_model):
    long = " ".join(["word"] * 200)
    feats = response_features(tiny_model, [long], max_tokens=16, progress=False)
    np.testing.assert_allclose(feats[0], unpadded_feature(tiny_model, long, max_tokens=16), atol=1e-5)


def test_judge_verdicts_are_the_thresholded_probabilities(tiny_model, rng, tmp_path):
    path = shipped_format_weights(tiny_model, rng).save(tmp_path / "w.json")
    judge = SemanticRefusalJudge.load(path, model=tiny_model)
    probs = judge.weights.probabilities(response_features(tiny_model, RESPONSES, progress=False))
    assert judge(["p"] * len(RESPONSES), RESPONSES) == [bool(p >= 0.5) for p in probs]
    np.testing.assert_allclose(judge.probabilities(RESPONSES), probs, rtol=1e-12)


def test_repeated_responses_are_featurised_once_with_the_same_probabilities(tiny_model, rng, monkeypatch):
    import sst_jax.eval.semantic_judge as sj
    judge = SemanticRefusalJudge(shipped_format_weights(tiny_model, rng), tiny_model)
    ref = judge.weights.probabilities(response_features(tiny_model, RESPONSES, progress=False))
    seen = []
    real = sj.response_features
    monkeypatch.setattr(sj, "response_features", lambda model, rs, **kw: seen.append(list(rs)) or real(model, rs, **kw))
    repeated = RESPONSES[::-1] + RESPONSES + RESPONSES[:2]
    np.testing.assert_allclose(judge.probabilities(repeated), np.concatenate([ref[::-1], ref, ref[:2]]), atol=1e-6)
    assert seen == [RESPONSES[::-1]]  # each distinct text once, in first-seen order
    np.testing.assert_array_equal(judge.probabilities(RESPONSES[1:3]), judge.probabilities(RESPONSES)[1:3])
    assert len(seen) == 1  # later calls reuse the verdicts already computed


def test_degenerate_responses_are_never_refusals(tiny_model, rng):
    judge = SemanticRefusalJudge(shipped_format_weights(tiny_model, rng, bias=50.0), tiny_model)
    responses = ["I cannot help.", "", "   ", "no no no no no no no no", "Sure."]
    assert judge(["p"] * 5, responses) == [True, False, False, False, True]


def test_weights_round_trip_through_the_shipped_json(tiny_model, rng, tmp_path):
    weights = shipped_format_weights(tiny_model, rng)
    path = weights.save(tmp_path / "w.json")
    loaded = SemanticWeights.load(path)
    for field in ("mean", "scale", "weights"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(weights, field))
    assert loaded.digest() == weights.digest()
    assert path.read_text() == loaded.to_json()
    assert json.loads(path.read_text())["feature_model"]["identity"]["d_model"] == tiny_model.config.d_model


def test_judge_name_carries_the_weights_digest(tiny_model, rng):
    judge = SemanticRefusalJudge(shipped_format_weights(tiny_model, rng), tiny_model)
    assert judge.name == f"semantic-lr-v1-{judge.weights.digest()[:8]}"


def test_judge_refuses_another_feature_model(tiny_model, rng):
    other = load_model("tiny", seed=1)
    with pytest.raises(SstJaxError, match="feature model"):
        SemanticRefusalJudge(shipped_format_weights(tiny_model, rng), other)


def test_corrupt_weights_file_is_named(tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{"format": 1, "mean": [0, 1], "scale": [1], "weights": [1, 2], "bias": 0, '
                    '"threshold": 0.5, "max_tokens": 8, "feature_model": {}, "training": {}, "name": "x"}')
    with pytest.raises(SstJaxError, match="lengths differ"):
        SemanticWeights.load(path)


def test_fit_weights_separates_separable_features(tiny_model, rng):
    x = rng.normal(size=(80, 4))
    y = x[:, 0] > 0
    weights = fit_weights(x, y, feature_model=feature_model_record(tiny_model), max_tokens=64, training={},
                          l2_grid=[1e-3, 1e-1], folds=4)
    assert ((weights.probabilities(x) >= 0.5) == y).mean() >= 0.95
    assert weights.training["n"] == 80 and weights.training["n_refused"] == int(y.sum())
    np.testing.assert_allclose(weights.mean, x.mean(axis=0))
