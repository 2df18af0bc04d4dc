"""The study's statistics: matched-L0 interpolation, image half-sample draws, the
hierarchical bootstrap (planted difference found, null difference covered), the paired
tests, and the verdict rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hsae.study.compare import (
    common_cells,
    compare_kinds,
    hierarchical_bootstrap,
    image_draws,
    interpolate_at,
    sae_curves,
    sign_flip_p,
)
from hsae.study.verdict import (
    CONTRADICTED,
    DESCRIPTIVE,
    INCONCLUSIVE,
    SUPPORTED,
    call,
    derived_metrics,
)


def test_interpolation_matches_a_hand_case():
    # Points at L0 = 4, 16 with values 1.0, 3.0: log-linear, so L0 = 8 (halfway in log) -> 2.0.
    out = interpolate_at(np.array([16.0, 4.0]), np.array([3.0, 1.0]), np.array([4.0, 8.0, 16.0]))
    np.testing.assert_allclose(out, [1.0, 2.0, 3.0])
    # Never extrapolated: outside the measured range is NaN.
    out = interpolate_at(np.array([4.0, 16.0]), np.array([1.0, 3.0]), np.array([2.0, 32.0]))
    assert np.isnan(out).all()
    # TopK's measured L0 is k up to float error: still read at k.
    out = interpolate_at(
        np.array([3.9999999, 8.0000001]), np.array([1.0, 2.0]), np.array([4.0, 8.0])
    )
    np.testing.assert_allclose(out, [1.0, 2.0], atol=1e-6)


def test_curves_compare_at_matched_l0_not_at_matched_k():
    # Two SAEs of one curve: (L0 4 -> 0.2), (L0 16 -> 0.6). A ReLU-like SAE's L0 is not its
    # k: the value at the target L0 = 8 is interpolated (0.4), not taken from the k=8 SAE.
    records = [
        {
            "layer_pos": 0,
            "network": "a",
            "sae_seed": 0,
            "expansion": 4,
            "k": k,
            "metrics": {"l0": l0, "m": v},
            "halves": [{"m": v - 0.01}, {"m": v + 0.01}],
        }
        for k, l0, v in ((8, 4.0, 0.2), (16, 16.0, 0.6))
    ]
    curves = sae_curves(records, "m", 0, [4], [4.0, 8.0, 16.0, 32.0])
    values = curves[("a", 0)]
    assert values.shape == (3, 4)  # full + 2 image draws, 4 targets
    np.testing.assert_allclose(values[0, :3], [0.2, 0.4, 0.6])
    assert np.isnan(values[0, 3])  # L0 = 32 is outside the measured range
    # common_cells drops the cell everywhere when one unit lacks it
    both = np.stack([values[None], values[None]])  # [units=2, seeds=1, draws, cells]
    assert common_cells(both).tolist() == [True, True, True, False]


def test_image_draws_have_the_full_estimates_variance():
    # Complementary halves of a mean: each half's deviation from the halves' mean has the
    # variance of the full-sample mean (balanced half-samples).
    rng = np.random.default_rng(0)
    deviations, fulls = [], []
    for _ in range(4000):
        x = rng.normal(size=200)
        perm = rng.permutation(200)
        h = [x[perm[:100]].mean(), x[perm[100:]].mean()]
        draws = image_draws(x.mean(), h)
        deviations.append(draws[1] - draws[0])
        fulls.append(x.mean())
    assert np.std(deviations) == pytest.approx(np.std(fulls), rel=0.1)
    assert image_draws(0.5, []).tolist() == [0.5]  # no halves: no image noise


def _kinds(
    rng,
    effect: float,
    n_units: int = 4,
    n_seeds: int = 3,
    unit_sd: float = 0.05,
    seed_sd: float = 0.02,
    img_sd: float = 0.01,
    n_cells: int = 3,
):
    """[units, seeds, 1 + 2 draws, cells] for both kinds: a backbone-level offset per unit
    (shared by the paired units), SAE-seed noise, image noise."""

    def kind(shift: float, unit_offsets: np.ndarray) -> np.ndarray:
        full = (
            shift
            + unit_offsets[:, None, None]
            + rng.normal(0, seed_sd, (n_units, n_seeds, 1))
            + np.zeros((1, 1, n_cells))
        )
        dev = rng.normal(0, img_sd, (n_units, n_seeds, n_cells))
        return np.stack([full, full + dev, full - dev], axis=2)

    shared = rng.normal(0, unit_sd, n_units)
    return kind(0.0, shared + rng.normal(0, 0.01, n_units)), kind(effect, shared)


def test_bootstrap_finds_a_planted_difference_and_covers_a_null_one():
    rng = np.random.default_rng(1)
    base, treat = _kinds(rng, effect=0.3)
    planted = compare_kinds("m", base, treat, paired=True, n_boot=2000, seed=0)
    assert planted.estimate == pytest.approx(0.3, abs=0.05)
    assert planted.ci_low > 0.15, planted
    assert call(planted, +1) == SUPPORTED and call(planted, -1) == CONTRADICTED
    # Null: over many simulated studies the 95% interval covers 0 most of the time.
    covered = 0
    for i in range(60):
        base, treat = _kinds(np.random.default_rng(100 + i), effect=0.0, n_units=6)
        null = compare_kinds("m", base, treat, paired=False, n_boot=500, seed=i)
        covered += null.ci_low <= 0 <= null.ci_high
    # A bootstrap over 6 units is somewhat too narrow; far above what a planted effect gives.
    assert covered / 60 >= 0.8, covered


def test_backbone_seed_noise_widens_the_interval():
    # The same SAE-level data, once with large differences between backbone seeds: the
    # hierarchical bootstrap must see them (an SAE-seed-only bootstrap would not).
    narrow = compare_kinds(
        "m", *_kinds(np.random.default_rng(2), 0.1, unit_sd=0.0), paired=False, n_boot=2000
    )
    wide = compare_kinds(
        "m", *_kinds(np.random.default_rng(2), 0.1, unit_sd=0.3), paired=False, n_boot=2000
    )
    assert (wide.ci_high - wide.ci_low) > 4 * (narrow.ci_high - narrow.ci_low)


def test_pairing_removes_shared_backbone_noise():
    # Paired units share a large backbone offset: the paired interval is much narrower.
    base, treat = _kinds(np.random.default_rng(3), 0.1, unit_sd=0.3)
    paired = compare_kinds("m", base, treat, paired=True, n_boot=2000)
    unpaired = compare_kinds("m", base, treat, paired=False, n_boot=2000)
    assert (paired.ci_high - paired.ci_low) * 3 < unpaired.ci_high - unpaired.ci_low
    assert paired.ci_low > 0 and unpaired.ci_low < 0


def test_image_draw_is_shared_across_kinds():
    # Image noise identical in both kinds (same images) cancels in the difference: the
    # interval is exactly the estimate when nothing else varies.
    full = np.ones((2, 1, 1, 1))
    noise = np.array([0.0, 0.5, -0.5]).reshape(1, 1, 3, 1)
    base = full + noise
    treat = full + 0.2 + noise
    boots = hierarchical_bootstrap(base, treat, paired=False, n_boot=300)
    np.testing.assert_allclose(boots, 0.2)


def test_sign_flip_exact_p():
    assert sign_flip_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 8)  # all positive
    assert sign_flip_p(np.array([1.0, -1.0])) == pytest.approx(1.0)
    assert math.isnan(sign_flip_p(np.array([])))


def test_paired_effect_size_and_test():
    rng = np.random.default_rng(4)
    base, treat = _kinds(rng, effect=0.3, n_units=5)
    e = compare_kinds("m", base, treat, paired=True, n_boot=500)
    assert e.effect_size > 3  # d_z: large planted effect, small noise
    assert e.p_test == pytest.approx(2 / 32)  # exact sign-flip, 5 positive differences
    one = compare_kinds("m", base[:1], treat[:1], paired=True, n_boot=500)
    assert math.isnan(one.effect_size) and one.n_units == (1, 1)


def test_verdict_rule():
    rng = np.random.default_rng(5)
    base, treat = _kinds(rng, effect=0.0, n_units=6, unit_sd=0.2)
    e = compare_kinds("m", base, treat, paired=False, n_boot=1000)
    assert call(e, +1) == INCONCLUSIVE and call(e, -1) == INCONCLUSIVE
    assert call(e, 0) == DESCRIPTIVE
    lower_better = compare_kinds("m", *_kinds(rng, effect=-0.3), paired=True, n_boot=1000)
    assert call(lower_better, -1) == SUPPORTED


def test_derived_metrics():
    m = {
        "interp/purity@family": 0.8,
        "interp/purity@genus": 0.6,
        "interp/purity@species": 0.4,
        "interp/sparse_probe@k1/family": 0.9,
        "interp/sparse_probe@k1/genus": 0.7,
        "control/hit_rate@family": 0.5,
        "control/hit_rate_baseline@family": 0.1,
    }
    d = derived_metrics(m)
    assert d["interp/purity@mean"] == pytest.approx(0.6)
    assert d["interp/sparse_probe@k1/mean"] == pytest.approx(0.8)
    assert d["control/hit_gain"] == pytest.approx(0.4)


def test_no_replication_gives_no_interval():
    # One unit, one SAE seed, no image draw: the difference is a single number, never "supported".
    base, treat = np.zeros((1, 1, 1, 2)), np.ones((1, 1, 1, 2))
    e = compare_kinds("m", base, treat, paired=False, n_boot=200)
    assert e.estimate == 1 and math.isnan(e.ci_low) and call(e, +1) == INCONCLUSIVE
