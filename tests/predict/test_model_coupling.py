"""The gene coupling: the correlation it measures, its joint draws, and the Gaussian conditioned on given genes."""

import numpy as np
import pytest
import torch

from hinge_cli.config import DiffusionConfig, GenerateConfig, load_config
from hinge_cli.formats.prediction import PredictedBatch
from hinge_cli.model import Hinge
from hinge_cli.predict.coupling import MIN_TRANSFER_SPOTS, SHRINKAGE, SHRINKAGES, GeneCoupling, JointGaussian, choose_joint, fit_correlation, image_transfer, optimism_factor
from hinge_cli.predict.predictive import Predictive, predictive
from hinge_cli.predict.ridge import GAUSSIAN_Q95
from hinge_cli.training.calibration import fit_coupling

R3 = np.array([[1.0, 0.8, -0.3], [0.8, 1.0, -0.2], [-0.3, -0.2, 1.0]])


def test_fit_correlation_recovers_a_known_correlation_shrunk_toward_the_identity():
    z = np.random.default_rng(0).multivariate_normal(np.zeros(3), R3, size=20000) * [1.0, 3.0, 0.5] + [2.0, -1.0, 0.0]
    fitted = fit_correlation(z)
    np.testing.assert_allclose(fitted, (1 - SHRINKAGE) * R3 + SHRINKAGE * np.eye(3), atol=0.02)
    flat = fit_correlation(np.c_[z[:, :2], np.full(len(z), 4.0)], shrinkage=0.0)
    np.testing.assert_array_equal(flat[2], [0.0, 0.0, 1.0])  # a gene that never varies is uncorrelated, not NaN


def test_uncoupled_draws_are_mean_plus_std_times_the_noise():
    mean, std, normal = torch.randn(4, 3), torch.rand(4, 3) + 0.1, torch.randn(4, 5, 3)
    out = GeneCoupling.independent(3).draw(mean, std, normal)
    torch.testing.assert_close(out.draws, mean[:, None] + std[:, None] * normal)


def test_coupled_draws_have_the_coupling_as_their_correlation():
    normal = torch.randn(1, 40000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = GeneCoupling(R3).draw(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64), normal)
    np.testing.assert_allclose(np.corrcoef(out.draws[0].numpy().T), R3, atol=0.02)
    np.testing.assert_allclose(out.draws[0].std(0).numpy(), [1.0, 2.0, 0.5], rtol=0.02)


def test_given_genes_condition_the_others_as_the_gaussian_formula_says():
    mean = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    std = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    given = torch.tensor([[True, False, False]])
    values = torch.tensor([[2.5, 0.0, 0.0]], dtype=torch.float64)
    normal = torch.randn(1, 50000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = GeneCoupling(R3).draw(mean, std, normal, given, values)
    z = (2.5 - 1.0) / 1.0  # the given gene's standardised residual
    expected_mean = [2.5, 2.0 + 2.0 * 0.8 * z, 3.0 + 0.5 * -0.3 * z]
    expected_std = [0.0, 2.0 * np.sqrt(1 - 0.8**2), 0.5 * np.sqrt(1 - 0.3**2)]
    np.testing.assert_allclose(out.mean[0].numpy(), expected_mean, rtol=1e-12)
    np.testing.assert_allclose(out.std[0].numpy(), expected_std, rtol=1e-12)
    draws = out.draws[0].numpy()
    assert (draws[:, 0] == 2.5).all()  # a given gene is its value in every draw
    np.testing.assert_allclose(draws.mean(0), expected_mean, atol=0.03)  # Matheron's rule draws from the conditional
    np.testing.assert_allclose(draws.std(0), expected_std, atol=0.02)


def test_spots_with_different_given_genes_are_each_conditioned_as_if_alone():
    g = torch.Generator().manual_seed(2)
    mean, std = torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g) + 0.2
    normal, values = torch.randn(5, 4, 3, generator=g), torch.randn(5, 3, generator=g)
    given = torch.tensor([[True, False, False], [False, False, False], [False, True, True], [True, False, False], [False, True, False]])
    coupling = GeneCoupling(R3)
    whole = coupling.draw(mean, std, normal, given, values)
    for i in range(5):
        alone = coupling.draw(mean[i:i + 1], std[i:i + 1], normal[i:i + 1], given[i:i + 1], values[i:i + 1])
        torch.testing.assert_close(whole.draws[i], alone.draws[0])


def test_giving_a_correlated_partner_lowers_the_error_of_the_other_gene():
    rng = np.random.default_rng(3)
    truth = rng.multivariate_normal(np.zeros(3), R3, size=2000)
    mean, std = torch.zeros(2000, 3, dtype=torch.float64), torch.ones(2000, 3, dtype=torch.float64)
    given = torch.zeros(2000, 3, dtype=torch.bool)
    given[:, 0] = True
    out = GeneCoupling(fit_correlation(truth, shrinkage=0.0)).draw(mean, std, torch.zeros(2000, 1, 3, dtype=torch.float64),
                                                                   given, torch.from_numpy(truth))
    error_alone = np.mean(truth[:, 1] ** 2)
    error_given = np.mean((truth[:, 1] - out.mean[:, 1].numpy()) ** 2)
    assert error_given < 0.5 * error_alone  # r = 0.8: the conditional variance is 1 - 0.64 of the marginal


def spread_model() -> Hinge:
    torch.manual_seed(0)
    model = Hinge.build(load_config("tiny").model, 30, torch.arange(1, 6), 4, DiffusionConfig(steps=10))
    with torch.no_grad():
        model.spread.token[-1].weight.normal_(0, 0.3)
    return model


def test_the_coupled_sampler_writes_its_gaussian_exactly_and_temperature_zero_is_its_mean():
    model, image = spread_model(), torch.randn(6, 4)
    cfg = GenerateConfig(n_samples=4, seed=3)
    pred = predictive(model, image, cfg, torch.arange(6), coupling=GeneCoupling(np.eye(5) * 0.5 + 0.5))
    mean, log_var = model.one_shot(image, seed=3, spot_index=torch.arange(6))
    torch.testing.assert_close(pred.point, mean)
    written = pred.batch(keep_draws=True)
    np.testing.assert_allclose(written.std, torch.exp(0.5 * log_var).numpy(), rtol=1e-5)
    np.testing.assert_allclose(written.q95, np.maximum(written.mean + GAUSSIAN_Q95 * written.std, 0), rtol=1e-5)
    cold = predictive(model, image, GenerateConfig(n_samples=4, seed=3, temperature=0.0), torch.arange(6)).batch(keep_draws=True)
    floored = np.maximum(cold.mean, 0)  # censored at the model space's floor where this untrained mean lies below it
    assert (cold.mean < 0).any() and np.array_equal(cold.draws, np.repeat(floored[:, None], 4, axis=1))
    assert not np.allclose(written.draws, cold.draws)


def test_coupled_predictions_do_not_depend_on_batch_size_and_given_genes_move_the_others():
    model, image = spread_model(), torch.randn(6, 4)
    cfg, coupling = GenerateConfig(n_samples=3, seed=1), GeneCoupling(np.eye(5) * 0.6 + 0.4)
    given = torch.zeros(6, 5, dtype=torch.bool)
    given[:4, 0] = True
    values = torch.full((6, 5), 3.0)
    whole = predictive(model, image, cfg, torch.arange(6), given, values, coupling=coupling)
    parts = [predictive(model, image[i:i + 3], cfg, torch.arange(i, i + 3), given[i:i + 3], values[i:i + 3], coupling=coupling)
             for i in (0, 3)]
    for name in ("point", "draws"):
        torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name), rtol=1e-5, atol=1e-6)
    plain = predictive(model, image, cfg, torch.arange(6), coupling=coupling)
    assert torch.equal(whole.point[given], values[given]) and torch.equal(whole.draws[:, :, 0][:4], torch.full((4, 3), 3.0))
    assert (whole.point[:4, 1:] > plain.point[:4, 1:]).all()  # positively coupled to a gene given above its mean
    torch.testing.assert_close(whole.point[4:], plain.point[4:])  # spots with nothing given are the image-only prediction


def test_fit_coupling_measures_a_correlation_matrix_of_the_model_residuals():
    model, image = spread_model(), torch.randn(40, 4)
    mean, _ = model.one_shot(image)
    truth = mean.numpy() + np.random.default_rng(0).multivariate_normal(np.zeros(5), np.eye(5) * 0.3 + 0.7, size=40)
    coupling = fit_coupling(model, image, truth, seed=0, spot_samples=np.repeat(["a", "b"], 20))
    correlation = np.asarray(coupling.correlation)
    assert correlation.shape == (5, 5) and np.asarray(coupling.joint_correlation).shape == (10, 10)
    assert coupling.joint_shrinkage in SHRINKAGES
    np.testing.assert_allclose(correlation, correlation.T)
    np.testing.assert_allclose(np.diag(correlation), 1.0)
    assert correlation[~np.eye(5, dtype=bool)].mean() > 0.4  # the residuals share a common factor


def test_a_model_without_a_spread_cannot_take_one_shot_draws():
    model = Hinge.build(load_config("tiny").model, 30, torch.arange(1, 6), 4, DiffusionConfig(steps=10, likelihood="mse"))
    with pytest.raises(Exception, match="no spread"):
        model.one_shot(torch.randn(2, 4))
    pred = predictive(model, torch.randn(2, 4), GenerateConfig(n_samples=2), torch.arange(2))  # falls back to the reverse process
    assert pred.std is None and pred.draws.shape == (2, 2, 5)


def test_the_joint_gaussian_predicts_a_gene_from_a_given_partner_and_the_image():
    rng = np.random.default_rng(4)
    n = 3000
    shared = rng.normal(size=n)
    truth = np.c_[shared + 0.1 * rng.normal(size=n), shared + 0.1 * rng.normal(size=n), rng.normal(size=n)]
    predicted = truth + rng.normal(size=truth.shape) * [2.0, 2.0, 0.1]  # the image says little of genes 0-1, much of 2
    joint = JointGaussian.fit(truth, predicted, shrinkage=0.0)
    given = torch.tensor([True, False, False])
    guess = joint.predict(torch.from_numpy(predicted), torch.from_numpy(truth), given).numpy()
    assert guess.shape == (n, 2)
    assert np.mean((guess[:, 0] - truth[:, 1]) ** 2) < 0.05  # gene 1 from its given partner, not from its poor image guess
    assert np.mean((guess[:, 1] - truth[:, 2]) ** 2) < 0.02  # gene 2 from its good image guess
    np.testing.assert_allclose(np.diag(joint.correlation), 1.0)


def test_choose_joint_picks_the_shrinkage_by_held_out_samples_and_works_with_one_sample():
    rng = np.random.default_rng(5)
    truth = rng.multivariate_normal(np.zeros(3), R3, size=600)
    predicted = truth + rng.normal(size=truth.shape)
    chosen = choose_joint(truth, predicted, np.repeat(["a", "b", "c"], 200))
    assert chosen.shrinkage in SHRINKAGES and chosen.shrinkage <= 0.1  # plenty of spots: little shrinkage pays
    alone = choose_joint(truth, predicted, np.repeat(["a"], 600))
    assert alone.shrinkage in SHRINKAGES and alone.correlation.shape == (6, 6)


def test_given_genes_take_the_joint_gaussians_conditional_mean():
    rng = np.random.default_rng(6)
    truth = rng.multivariate_normal(np.zeros(3), R3, size=500)
    joint = JointGaussian.fit(truth, truth * 0.5 + rng.normal(size=truth.shape), shrinkage=0.05)
    mean, std = torch.zeros(4, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
    given = torch.tensor([[True, False, False]] * 4)
    values = torch.tensor([[2.0, 0.0, 0.0]] * 4, dtype=torch.float64)
    out = GeneCoupling(R3, joint).draw(mean, std, torch.zeros(4, 2, 3, dtype=torch.float64), given, values)
    expected = joint.predict(mean, values, given[0])
    torch.testing.assert_close(out.mean[:, 1:], expected)
    assert (out.mean[:, 0] == 2.0).all() and (out.mean[:, 1] > 0.5).all()  # gene 1 follows its given partner (r = 0.8)


def test_a_deflated_joint_trusts_the_image_less_and_at_zero_ignores_it():
    rng = np.random.default_rng(7)
    truth = rng.multivariate_normal(np.zeros(3), R3, size=800)
    joint = JointGaussian.fit(truth, truth + 0.5 * rng.normal(size=truth.shape), shrinkage=0.05)
    np.testing.assert_array_equal(joint.deflated(1.0).correlation, joint.correlation)
    half = joint.deflated(0.5).correlation
    np.testing.assert_allclose(half[:3, 3:], 0.5 * joint.correlation[:3, 3:])
    np.testing.assert_array_equal(half[:3, :3], joint.correlation[:3, :3])  # truth-truth and prediction blocks kept
    np.testing.assert_array_equal(half[3:, 3:], joint.correlation[3:, 3:])
    assert np.linalg.eigvalsh(half).min() > 0  # still a correlation matrix
    given, values = torch.tensor([True, False, False]), torch.from_numpy(truth[:5])
    blind = joint.deflated(0.0)
    one, other = (blind.predict(torch.from_numpy(p), values, given) for p in (truth[:5] + 3.0, truth[:5] - 3.0))
    torch.testing.assert_close(one, other)  # at zero the prediction no longer moves the other genes
    moved = [joint.predict(torch.from_numpy(p), values, given) for p in (truth[:5] + 3.0, truth[:5] - 3.0)]
    assert (moved[0] > moved[1]).all()


def test_the_optimism_factor_is_the_held_out_share_of_the_in_sample_fit():
    rng = np.random.default_rng(8)
    truth = rng.normal(size=(500, 4))
    close, loose = truth + 0.3 * rng.normal(size=truth.shape), truth + 1.5 * rng.normal(size=truth.shape)
    assert optimism_factor((close, truth), (close, truth)) == 1.0
    factor = optimism_factor((close, truth), (loose, truth))
    expected = np.mean([np.corrcoef(loose[:, g], truth[:, g])[0, 1] for g in range(4)]) / np.mean(
        [np.corrcoef(close[:, g], truth[:, g])[0, 1] for g in range(4)])
    assert factor == pytest.approx(expected) and 0.4 < factor < 0.7
    assert optimism_factor((close, truth), (-close, truth)) == 0.0  # anti-correlated out of sample: trust nothing
    assert optimism_factor((loose, truth), (close, truth)) == 1.0  # a better held-out fit never inflates
    assert optimism_factor((np.ones_like(truth), truth), (close, truth)) == 1.0  # nothing measurable in sample


def test_fit_coupling_deflates_the_joint_gaussians_cross_correlations():
    model, image = spread_model(), torch.randn(40, 4)
    mean, _ = model.one_shot(image)
    truth = mean.numpy() + np.random.default_rng(0).normal(size=(40, 5))
    plain, deflated = (fit_coupling(model, image, truth, seed=0, spot_samples=np.repeat(["a", "b"], 20), deflation=d)
                       for d in (1.0, 0.25))
    assert plain.joint_deflation == 1.0 and deflated.joint_deflation == 0.25
    np.testing.assert_allclose(np.asarray(deflated.joint_correlation)[:5, 5:], 0.25 * np.asarray(plain.joint_correlation)[:5, 5:],
                               atol=1e-5)


def test_optimism_is_measured_on_the_networks_one_shot_means_and_is_1_for_a_mean_only_network():
    from hinge_cli.predict.predictive import one_shot_predictions
    from hinge_cli.training.calibration import measure_optimism

    image = torch.randn(60, 4)
    model = spread_model()
    predicted = np.concatenate([one_shot_predictions(model, half, 30, 0)[0] for half in (image[:30], image[30:])])
    truth = predicted + 0.1 * predicted.std(0) * np.random.default_rng(0).normal(size=(60, 5))
    same = measure_optimism(model, (image[:30], truth[:30]), (image[30:], truth[30:]), seed=0)
    shuffled = measure_optimism(model, (image[:30], truth[:30]), (image[30:], truth[30:][::-1]), seed=0)
    assert same > 0.9 and shuffled < 0.5
    mse = Hinge.build(load_config("tiny").model, 30, torch.arange(1, 6), 4, DiffusionConfig(steps=10, likelihood="mse"))
    assert measure_optimism(mse, (image[:30], truth[:30]), (image[30:], truth[30:]), seed=0) == 1.0


def test_draws_below_the_floor_are_censored_and_a_samples_mean_follows():
    draws = torch.tensor([[[-1.0, 2.0, 0.5], [3.0, -0.5, 0.5]]])  # one spot, two draws, three genes (the last given)
    center = torch.tensor([[1.0, 0.75, 0.5]])
    pred = Predictive(center, draws, center, given=torch.tensor([[False, False, True]]))
    assert pred.censored(0.0, point_from_draws=True).draws.tolist() == [[[0.0, 2.0, 0.5], [3.0, 0.0, 0.5]]]
    assert pred.censored(0.0, point_from_draws=True).point.tolist() == [[1.5, 1.0, 0.5]]
    assert pred.censored(0.0, point_from_draws=False).point.tolist() == center.tolist()  # the one-shot mean stays
    layers = PredictedBatch(np.array([[-0.2]]), np.array([[1.0]]), np.array([[-1.8]]), np.array([[1.4]]), np.array([[[-0.3]]]))
    floored = layers.censored(0.0)
    values = [float(a.ravel()[0]) for a in (floored.mean, floored.std, floored.q05, floored.q95, floored.draws)]
    assert values == [-0.2, 1.0, 0.0, 1.4, 0.0]  # the mean and std are the model's own


def _image_and_truth(rng: np.random.Generator, n: int, g: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Truth and an image prediction of it that tracks it with r ~ 0.7."""
    truth = rng.standard_normal((n, g))
    return truth, truth + rng.standard_normal((n, g))


def test_the_image_keeps_its_weight_where_it_predicts_the_given_genes_as_in_training_and_loses_it_where_not():
    rng = np.random.default_rng(0)
    joint = JointGaussian.fit(*_image_and_truth(rng, 4000), 0.05)
    truth, predicted = _image_and_truth(rng, 600)
    mask = np.zeros(truth.shape, bool)
    mask[:, :3] = True
    kept = image_transfer(joint, predicted, truth, mask)
    assert kept.weight > 0.9 and kept.n_genes == 3 and abs(kept.slide_r - kept.expected_r) < 0.1
    lost = image_transfer(joint, predicted[rng.permutation(len(predicted))], truth, mask)  # the image says nothing here
    assert lost.weight < 0.15
    assert image_transfer(joint, predicted, truth, mask & (np.arange(600) < MIN_TRANSFER_SPOTS - 1)[:, None]).weight == 1.0


def test_count_noise_on_a_shallow_slide_does_not_cost_the_image_its_weight():
    rng = np.random.default_rng(1)
    joint = JointGaussian.fit(*_image_and_truth(rng, 4000), 0.05)
    truth, predicted = _image_and_truth(rng, 800)
    noise = np.full(truth.shape, 1.5)
    shallow = truth + np.sqrt(noise) * rng.standard_normal(truth.shape)
    mask = np.ones(truth.shape, bool)
    naive = image_transfer(joint, predicted, shallow, mask)
    assert naive.weight < 0.8  # counting noise attenuates the correlation
    assert image_transfer(joint, predicted, shallow, mask, noise).weight > 0.9


def test_count_noise_comes_off_the_residual_correlation():
    rng = np.random.default_rng(2)
    rate = np.array([[1.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 1.0]])
    z = rng.multivariate_normal(np.zeros(3), rate, 60_000)
    noise = np.tile([1.0, 3.0, 0.5], (len(z), 1))  # counting, independent across genes
    observed = z + np.sqrt(noise) * rng.standard_normal(z.shape)
    diluted = fit_correlation(observed, 0.0)
    assert diluted[0, 1] < 0.35  # 0.6 / sqrt(2 x 4)
    np.testing.assert_allclose(fit_correlation(observed, 0.0, noise), rate, atol=0.03)
    everything_noise = fit_correlation(observed, 0.0, np.full(z.shape, 100.0))  # noise beyond the variance: floored, still a correlation
    assert np.all(np.abs(everything_noise) <= 1.0) and np.allclose(np.diag(everything_noise), 1.0)
    overshot = fit_correlation(np.c_[observed, observed[:, :1] + 0.01 * rng.standard_normal((len(z), 1))], 0.0,
                               np.c_[noise, noise[:, :1]])  # two near-copies of a gene, noise taken out: no longer PSD unfixed
    assert np.linalg.eigvalsh(overshot).min() > 0 and np.allclose(np.diag(overshot), 1.0)
