"""User-level differential privacy in the round (``core.privacy``): DP-FedAvg's clipping
and noise against NumPy, the noise's spread, the accountant's ε in the records, the
calibration to a target ε, and the refusals."""

from __future__ import annotations

import json

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_model, random_federated

from fedjax_sim import algorithms
from fedjax_sim.core import privacy
from fedjax_sim.data.federated import FederatedData


def equal_sizes(seed=0, num_clients=6, n=12, t=5, dim=6, classes=4) -> FederatedData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_clients, n, dim)).astype(np.float32)
    y = rng.integers(0, classes, (num_clients, n)).astype(np.int32)
    tx = rng.normal(size=(num_clients, t, dim)).astype(np.float32)
    ty = rng.integers(0, classes, (num_clients, t)).astype(np.int32)
    counts = np.full(num_clients, n, np.int32)
    return FederatedData(x, y, counts, tx, ty, np.full(num_clients, t, np.int32),
                         num_classes=classes, name="equal")


COMMON = {"local_epochs": 1, "batch_size": 4, "lr": 0.3}


def two_layers():
    from fedjax_sim.models import make_model

    return make_model("mlp", (6,), 4, hidden=(8,))


def rounds(name, data, count=2, **hp):
    # FedPer needs a body beside its head.
    model = two_layers() if name == "fedper" else linear_model(6, 4)
    alg = algorithms.make(name, model, **COMMON, **hp)
    state = alg.init(jax.random.key(3), data)
    step = jax.jit(alg.round)
    metrics = []
    for _ in range(count):
        state, m = step(state, data)
        metrics.append(m)
    return alg, state, metrics


def close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["fedavg", "fedper"])
def test_no_noise_and_no_clipping_is_the_uniform_mean(name):
    # σ = 0 and C above every update norm: the round is the plain mean of the members'
    # updates; with equal client sizes FedAvg's sample-weighted mean is that mean too
    # (to float rounding: θ + mean(θ_k − θ) against mean(θ_k)).
    data = equal_sizes()
    for join in (1.0, 0.5):
        _, plain, _ = rounds(name, data, join_ratio=join)
        _, dp, metrics = rounds(name, data, join_ratio=join, dp="fixed",
                                dp_sampling="fixed", dp_noise_multiplier=0.0,
                                dp_clip_norm=1e9)
        close(dp.server["params"], plain.server["params"], 1e-6)
        close(dp.clients, plain.clients, 1e-6)
        assert float(metrics[-1]["dp_unclipped_fraction"]) == 1.0


def test_privatize_equals_numpy():
    rng = np.random.default_rng(0)
    sent = {"a": rng.normal(size=(3, 2)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
    uploads = {k: v[None] + rng.normal(size=(5, *v.shape)).astype(np.float32) * s
               for (k, v), s in zip(sent.items(), (0.1, 2.0), strict=True)}
    present = np.array([True, True, False, True, True])
    static = {"dp": "fixed", "dp_sampling": "poisson", "join_ratio": 0.4}
    hp = {"dp_noise_multiplier": 0.0, "dp_clip_norm": 1.5}
    merged, _, metrics = privacy.privatize(
        hp, static, 10, {"clip_norm": jnp.float32(1.5)}, sent, uploads,
        jnp.asarray(present), jax.random.key(0))
    deltas = {k: uploads[k] - sent[k][None] for k in sent}
    norms = np.sqrt(sum((d.reshape(5, -1) ** 2).sum(1) for d in deltas.values()))
    scale = np.minimum(1.0, 1.5 / norms) * present
    for k in sent:
        expect = sent[k] + np.tensordot(scale, deltas[k], axes=1) / (0.4 * 10)
        np.testing.assert_allclose(np.asarray(merged[k]), expect, atol=1e-6)
    assert int(metrics["dp_cohort"]) == 4
    assert float(metrics["dp_unclipped_fraction"]) == np.mean(norms[present] <= 1.5)


def test_adaptive_clip_step_equals_numpy():
    rng = np.random.default_rng(1)
    sent = {"w": np.zeros((8,), np.float32)}
    uploads = {"w": rng.normal(size=(6, 8)).astype(np.float32)}
    norms = np.linalg.norm(uploads["w"], axis=1)
    static = {"dp": "adaptive", "dp_sampling": "fixed", "join_ratio": 1.0,
              "dp_count_noise_multiplier": 1e-9}
    hp = {"dp_noise_multiplier": 0.0, "dp_clip_norm": 2.0, "dp_target_quantile": 0.3,
          "dp_clip_lr": 0.2}
    _, new, _ = privacy.privatize(hp, static, 6, {"clip_norm": jnp.float32(2.5)}, sent,
                                  uploads, None, jax.random.key(0))
    fraction = np.mean(norms <= 2.5)
    np.testing.assert_allclose(float(new["clip_norm"]), 2.5 * np.exp(-0.2 * (fraction - 0.3)),
                               rtol=1e-5)


def test_noise_spread_matches_sigma_c_over_the_expected_cohort():
    # Zero updates: the server's step is the noise alone, σ C / (q N) per coordinate.
    sent = {"w": jnp.zeros((500,))}
    uploads = {"w": jnp.zeros((8, 500))}
    static = {"dp": "fixed", "dp_sampling": "poisson", "join_ratio": 0.25}
    hp = {"dp_noise_multiplier": 1.3, "dp_clip_norm": 0.7}

    def step(key):
        merged, _, _ = privacy.privatize(hp, static, 32, {"clip_norm": jnp.float32(0.7)},
                                         sent, uploads, None, key)
        return merged["w"]

    draws = np.asarray(jax.vmap(step)(jax.random.split(jax.random.key(0), 200)))
    expected = 1.3 * 0.7 / (0.25 * 32)
    assert abs(draws.std() / expected - 1) < 0.02  # 100,000 draws: std error ~0.22%
    assert abs(draws.mean()) < 3 * expected / np.sqrt(draws.size)


def test_same_seed_same_noise_other_seed_or_sigma_other_noise():
    data = equal_sizes()
    hp = dict(join_ratio=0.5, dp="fixed", dp_noise_multiplier=1.0, dp_clip_norm=0.5)
    alg, first, _ = rounds("fedavg", data, **hp)
    _, again, _ = rounds("fedavg", data, **hp)
    close(first.server["params"], again.server["params"], 0)
    other = alg.init(jax.random.key(4), data)
    other, _ = jax.jit(alg.round)(other, data)
    assert not np.allclose(first.server["params"]["head"]["bias"],
                           other.server["params"]["head"]["bias"])
    # Two configurations of a sweep with the same seed draw independent noise.
    key = jax.random.key(0)
    a = privacy.noise_key(key, alg.hp())
    b = privacy.noise_key(key, alg.hp(dp_noise_multiplier=1.1))
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_poisson_draw_has_the_binomial_cohort():
    static = {"dp_sampling": "poisson", "join_ratio": 0.1}
    draws = jax.vmap(lambda k: privacy.draw(k, static, 200))(
        jax.random.split(jax.random.key(0), 400))
    counts = np.asarray(draws.present).sum(1)
    assert abs(counts.mean() - 20) < 0.7  # std of the mean: sqrt(18 / 400) ~ 0.21
    assert abs(counts.var() / 18 - 1) < 0.25
    slots = privacy.poisson_capacity(200, 0.1)
    assert np.asarray(draws.index).shape == (400, slots)
    for index in np.asarray(draws.index)[:20]:
        assert len(set(index.tolist())) == slots
    assert not np.asarray(draws.truncated).any()


def test_adaptive_clipping_tracks_the_target_quantile_in_the_round():
    # Clients whose updates have known, spread norms: C moves to their median.
    data = random_federated(num_clients=10)
    _, state, metrics = rounds("fedavg", data, count=40, dp="adaptive",
                               dp_sampling="fixed", dp_noise_multiplier=0.0,
                               dp_count_noise_multiplier=1e-9, dp_clip_norm=50.0,
                               dp_target_quantile=0.5, dp_clip_lr=0.3)
    fractions = [float(m["dp_unclipped_fraction"]) for m in metrics[-10:]]
    assert float(state.privacy["clip_norm"]) < 5.0
    assert 0.3 <= np.mean(fractions) <= 0.7


def test_records_carry_the_accountants_epsilon(tmp_path):
    from fedjax_sim.cli import main

    out = tmp_path / "run"
    main(["run", "--dataset", "synthetic", "--num-clients", "10", "--rounds", "4",
          "--eval-every", "2", "--local-epochs", "1", "--join-ratio", "0.3", "--dp", "fixed",
          "--dp-noise-multiplier", "1.1", "--dp-clip-norm", "0.5", "--no-progress",
          "--output", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            0.3, dp_accounting.GaussianDpEvent(1.1)), record["round"])
        assert record["dp_epsilon"] == pytest.approx(accountant.get_epsilon(0.1), rel=1e-6)
        assert record["dp_delta"] == 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp_epsilon"] == records[-1]["dp_epsilon"]
    assert summary["status"] == "complete"


def test_target_epsilon_calibrates_sigma_before_the_run():
    from fedjax_sim.core import accountant
    from fedjax_sim.spec import ExperimentSpec, check_spec

    spec = check_spec(ExperimentSpec(algorithm="fedavg", dataset="synthetic", num_clients=50,
                                     rounds=20, hparams=(("dp", "fixed"),
                                                         ("join_ratio", 0.2),
                                                         ("dp_target_epsilon", 2.0))))
    sigma = dict(spec.hparams)["dp_noise_multiplier"]
    args = dict(delta=1 / 50, sampling="poisson", rate=0.2, num_clients=50, steps=20)
    assert accountant.epsilon(sigma, **args) <= 2.0
    assert accountant.epsilon(sigma * 0.97, **args) > 2.0


@pytest.mark.parametrize("hparams, needle", [
    ((("dp", "fixed"), ("dp_noise_multiplier", -1.0)), "dp_noise_multiplier"),
    ((("dp", "fixed"), ("dp_clip_norm", 0.0)), "dp_clip_norm"),
    ((("dp", "fixed"), ("dp_delta", 1.0)), "dp_delta"),
    ((("dp", "fixed"), ("dp_target_quantile", 1.5)), "dp_target_quantile"),
    ((("dp", "laplace"),), "dp"),
    ((("dp_noise_multiplier", 1.0),), "needs dp fixed or adaptive"),
    ((("dp", "fixed"), ("dp_delta", 1e-9), ("dp_target_epsilon", 1e-3)),
     "dp_target_epsilon"),
    ((("dp", "adaptive"), ("dp_noise_multiplier", 2.0), ("dp_count_noise_multiplier", 0.5)),
     "dp_count_noise_multiplier"),
    ((("dp", "fixed"), ("dp_noise_multiplier", 0.3), ("dp_target_epsilon", 1.0)),
     "rounds fit"),
    ((("dp", "fixed"), ("dp_accountant", "pld"), ("dp_sampling", "fixed"),
      ("dp_target_epsilon", 4.0)), "dp_accountant"),
])
def test_bad_privacy_input_is_refused_before_anything_loads(hparams, needle):
    from fedjax_sim.spec import ExperimentSpec, check_spec

    with pytest.raises(ValueError, match=needle):
        check_spec(ExperimentSpec(algorithm="fedavg", dataset="synthetic", rounds=30,
                                  hparams=(("join_ratio", 0.5), *hparams)))


@pytest.mark.parametrize("spec_options, needle", [
    (dict(algorithm="dsfl"), "dsfl does not run under differential privacy"),
    (dict(algorithm="scaffold"), "scaffold does not run under differential privacy"),
    (dict(algorithm="fedavg", system="lognormal"), "virtual clock"),
])
def test_algorithms_and_conditions_outside_dp_are_refused(spec_options, needle):
    from fedjax_sim.spec import ExperimentSpec, check_spec

    with pytest.raises(ValueError, match=needle):
        check_spec(ExperimentSpec(dataset="synthetic", hparams=(("dp", "fixed"),),
                                  **spec_options))


def test_a_sweep_over_sigma_and_seeds_is_one_program(tmp_path, capsys):
    from conftest import write_toml

    from fedjax_sim.cli import main

    config = write_toml(tmp_path, """
        dataset = "synthetic"
        num_clients = 10
        rounds = 2
        local_epochs = 1
        algorithm = "fedper"
        dp = "fixed"
        join_ratio = 0.5
        dp_noise_multiplier = [0.5, 1.0]
        seed = [0, 1]
        no_progress = true
    """)
    main(["sweep", "--config", str(config), "--output", str(tmp_path / "out")])
    assert "4 runs to do in 1 program" in capsys.readouterr().err
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    epsilons = sorted({round(json.loads(line)["dp_epsilon"], 9) for line in lines})
    assert len(epsilons) == 2


def test_num_samples_sets_the_mnist1d_generator_and_nothing_else():
    from fedjax_sim.spec import ExperimentSpec, build_data, check_spec

    with pytest.raises(ValueError, match="num_samples sets how many examples the mnist1d"):
        check_spec(ExperimentSpec(dataset="digits", num_samples=2000))
    spec = check_spec(ExperimentSpec(dataset="mnist1d", num_samples=600, num_clients=10))
    data, _ = build_data(spec)
    total = int(np.asarray(data.train_counts).sum() + np.asarray(data.test_counts).sum())
    assert total == 600


def test_resume_continues_the_clip_norm_and_the_noise(tmp_path):
    from fedjax_sim.cli import main

    def run(folder, rounds, *extra):
        main(["run", "--dataset", "synthetic", "--num-clients", "10", "--rounds", str(rounds),
              "--eval-every", "2", "--local-epochs", "1", "--join-ratio", "0.3", "--dp",
              "adaptive", "--checkpoint-every", "2", "--no-progress", "--output",
              str(tmp_path / folder), *extra])
        return [json.loads(line) for line in
                (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, "--resume")
    keys = ("round", "accuracy", "dp_clip_norm_now", "dp_epsilon")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
