"""The bundled digits model makes real digits, judged by a classifier trained on real ones.

A scikit-learn MLP (one hidden layer of 64 ReLU units) is trained on the real training
split of scikit-learn's digits. It scores N generated digits (respaced ancestral
sampling, 100 steps, fixed seed) and the N real held-out digits the model never saw:

- mean top-class probability: the classifier is confident the image is some digit;
- entropy of the predicted-class histogram (ln 10 = 2.303 when all ten are equally
  frequent): every digit is generated, not a few;
- Frechet distance between the hidden-layer features of the generated and the held-out
  digits, next to the same distance between two real sets of the same size (a random
  N of the training split against the held-out N).

The thresholds below are stated in the README. Figures: `python -m tests.test_quality`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import data
from fastddpm.checkpoints import DEFAULT_MODEL

N = 360  # the size of the held-out split
# Thresholds (also in the README). Measured for the bundled model: mean top probability 0.976
# (real held-out 0.979), class entropy 2.278 (held-out 2.279), fewest per class 23, FD 36.6
# against 34.5 for real against real (ratio 1.06).
MIN_MEAN_TOP_PROBABILITY = 0.90
MIN_CLASS_ENTROPY = 2.20
MIN_PER_CLASS = 15  # of N: every digit appears
MAX_FD_RATIO = 1.5  # FD(generated, held-out) <= this x FD(real, held-out)


def classifier():
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=0)
    return clf.fit(features_input(data.digits("train")), data.digit_labels("train"))


def features_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 1, 8, 8) -> (N, 64) in scikit-learn's 0..16 scale."""
    return images.reshape(len(images), -1).astype(np.float64) * (16 / 255)


def hidden_features(clf, images: np.ndarray) -> np.ndarray:
    return np.maximum(features_input(images) @ clf.coefs_[0] + clf.intercepts_[0], 0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, d)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum of sqrt of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD).
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    return float(
        ((mu_a - mu_b) ** 2).sum()
        + np.trace(s_a)
        + np.trace(s_b)
        - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    )


def scores(clf, images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    probabilities = clf.predict_proba(features_input(images))
    counts = np.bincount(probabilities.argmax(1), minlength=10)
    p = counts / counts.sum()
    return {
        "mean_top_probability": float(probabilities.max(1).mean()),
        "class_entropy": float(-(p[p > 0] * np.log(p[p > 0])).sum()),
        "min_per_class": int(counts.min()),
        "fd_to_heldout": frechet_distance(hidden_features(clf, images), hidden_features(clf, reference)),
    }


def generated_digits() -> np.ndarray:
    sampler = fastddpm.load(DEFAULT_MODEL)
    x = sampler.sample(N, steps=100, progress=False, generator=torch.Generator().manual_seed(0))
    return fastddpm.to_uint8(x).transpose(0, 3, 1, 2)


def measure() -> dict[str, dict[str, float]]:
    clf = classifier()
    heldout = data.digits("heldout")
    real = data.digits("train")[np.random.default_rng(0).choice(1437, N, replace=False)]
    return {
        "generated": scores(clf, generated_digits(), heldout),
        "real (train subset)": scores(clf, real, heldout),
        "real (held-out itself)": scores(clf, heldout, heldout),
    }


@pytest.fixture(scope="module")
def figures():
    return measure()


def test_frechet_distance_is_right_on_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = rng.standard_normal((20000, 3)) * 2 + 1  # mean shift 1 per dim; sigma 2: Tr = 3 * (1 + 4 - 4)
    assert frechet_distance(a, b) == pytest.approx(3 * 1 + 3 * 1, rel=0.05)


def test_generated_digits_are_confident(figures):
    assert figures["generated"]["mean_top_probability"] >= MIN_MEAN_TOP_PROBABILITY, figures


def test_all_ten_digits_appear(figures):
    assert figures["generated"]["class_entropy"] >= MIN_CLASS_ENTROPY, figures
    assert figures["generated"]["min_per_class"] >= MIN_PER_CLASS, figures


def test_frechet_distance_near_real_data(figures):
    generated, real = figures["generated"]["fd_to_heldout"], figures["real (train subset)"]["fd_to_heldout"]
    assert generated <= MAX_FD_RATIO * real, figures


if __name__ == "__main__":
    for name, values in measure().items():
        print(f"{name:24s}", {k: round(v, 4) for k, v in values.items()})
