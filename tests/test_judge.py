import numpy as np

from obliviate.shapes.train import judge_accuracy


def test_shipped_judge_is_accurate_on_fresh_renders(shapes_judge):
    accuracy = judge_accuracy(shapes_judge, n=432, seed=987654)
    assert set(accuracy) == {"object", "colour", "style", "background"}
    assert min(accuracy.values()) >= 0.99, accuracy


def test_frechet_distance_separates_distributions():
    from obliviate.evaluate.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    shifted = rng.normal(loc=1.0, size=(500, 8))
    assert frechet_distance(a, b) < 0.3
    assert abs(frechet_distance(a, shifted) - 8.0) < 1.5
