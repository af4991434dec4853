"""IncFL at 20 rounds on digits, Dirichlet α = 0.1 (experiments/incentives.md): the label
skew that client-uniform weights aggregate, and the class the global model predicts.

  python experiments/incentives_collapse.py --seeds 0,1,2,3,4,5,6,7,8,9

Per seed (each its own partition, the CLI defaults otherwise), after 20 rounds of FedAvg
(sample-weighted mean of the clients' models), IncFL with flat weights (temperature 1e6:
every client 1/K, sample counts ignored) and IncFL (temperature 1, ρ_k from 20 rounds of
Local): the test accuracy, the share of test rows each model assigns to the class c* that
is most frequent in the client-uniform label distribution (1/K Σ_k p_k(y), each client
counted once, as in MaxFL's appeal objective), next to c*'s share of that distribution and
of the training samples, and the share of test rows in the model's most predicted class
(100% for a model that predicts one class everywhere).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from fedjax_sim.runner import to_device
from fedjax_sim.spec import ExperimentSpec, build, check_spec

RUNS = (("fedavg", "fedavg", {}),
        ("incfl flat", "incfl", {"incfl_temperature": 1e6, "incfl_local_rounds": 20}),
        ("incfl", "incfl", {"incfl_local_rounds": 20}))


def label_marginals(data) -> tuple[np.ndarray, np.ndarray]:
    """The client-uniform and the sample-weighted label distributions of the training
    rows, each (C,)."""
    y, n = np.asarray(data.train_y), np.asarray(data.train_counts)
    own = np.stack([np.bincount(y[k, :n[k]], minlength=data.num_classes) / max(n[k], 1)
                    for k in range(data.num_clients)])
    return own.mean(axis=0), (own * n[:, None]).sum(axis=0) / n.sum()


def final_predictions(algorithm, data, model, seed: int, rounds: int) -> np.ndarray:
    """The predicted classes of every test row after ``rounds`` rounds."""
    state = jax.jit(algorithm.init)(jax.random.key(seed), data)
    step = jax.jit(algorithm.round)
    for _ in range(rounds):
        state, _ = step(state, data)
    x, n = np.asarray(data.test_x), np.asarray(data.test_counts)
    apply = jax.jit(model.apply)
    return np.concatenate([np.argmax(np.asarray(apply(state.server["params"], x[k, :n[k]])),
                                     axis=-1) for k in range(data.num_clients)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args(argv)
    print("| seed | c* | c* client-uniform % | c* samples % | "
          + " | ".join(f"{name}: accuracy % / rows → c* % / rows → its top class %"
                       for name, _, _ in RUNS) + " |")
    print("|" + "---|" * (4 + len(RUNS)))
    for seed in (int(s) for s in args.seeds.split(",")):
        cells = []
        for _, algorithm, hparams in RUNS:
            spec = check_spec(ExperimentSpec(algorithm=algorithm, dataset="digits",
                                             alpha=args.alpha, rounds=args.rounds, seed=seed,
                                             hparams=hparams))
            built = build(spec)
            data = to_device(built.data)
            predicted = final_predictions(built.algorithm, data, built.model, seed,
                                          args.rounds)
            uniform, samples = label_marginals(built.data)
            top = int(np.argmax(uniform))
            labels = np.concatenate([np.asarray(built.data.test_y[k, :built.data.test_counts[k]])
                                     for k in range(built.data.num_clients)])
            mode = np.bincount(predicted, minlength=built.data.num_classes).max()
            cells.append(f"{100 * np.mean(predicted == labels):.1f} / "
                         f"{100 * np.mean(predicted == top):.1f} / "
                         f"{100 * mode / predicted.size:.1f}")
        print(f"| {seed} | {top} | {100 * uniform[top]:.1f} | {100 * samples[top]:.1f} | "
              + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
