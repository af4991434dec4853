"""fedjax-sim against a plain PyTorch implementation of six methods, on one partition.

FedAvg, Local, FedPer, FedRep, LG-FedAvg and Ditto, each written here as a short PyTorch
loop from the methods' definitions, run side by side with fedjax-sim on the same client
data: the partition is drawn once (digits, 20 clients, Dirichlet α 0.1, seed 0) and saved
with the simulator's partition-file support, and both sides read that file (the PyTorch
side through ``fedjax_sim.data.make_federated_data(partition_file=...)``, which yields
every client's train and test arrays; only the training and the evaluation below are
PyTorch). Seeds vary the initialization and the batch orders: fedjax-sim runs with PyTorch's
``nn.Linear`` initialization (``init="torch"``), the PyTorch side with
``torch.manual_seed(seed)`` and default ``nn.Linear`` layers. The two sides do not share
random numbers, so they agree in distribution, not step by step. ``--lockstep`` runs the
step-by-step check instead: the PyTorch loop from fedjax-sim's initial weights, visiting
the samples in the orders fedjax-sim drew (read out of its compiled round), must reach
fedjax-sim's accuracy exactly.

The PyTorch side, per round and client: a deep copy of the global model (with the
client's personal layers loaded where the method keeps some), ``torch.optim.SGD`` (lr
0.05, no momentum, no weight decay) over ``torch.randperm`` batches of 32, the last one
partial, a fresh permutation per epoch; the server takes the sample-weighted average of
the uploaded state dicts (n_k / Σ n). Methods, with fedjax-sim's defaults:

- FedAvg: train every layer ``local_epochs`` epochs, upload all.
- Local: every client trains its own model, nothing is averaged.
- FedPer: train every layer; the head (the last layer) stays on the client, the rest is
  averaged.
- FedRep: ``local_epochs - body_epochs`` epochs on the head alone (base frozen), then
  ``body_epochs`` (1) on the base alone (head frozen), each phase with its own optimizer
  and permutations; the head stays on the client.
- LG-FedAvg: train every layer; the head is shared and averaged (``lg_global_layers``
  unset), ``fc1`` and ``fc2`` stay on the client.
- Ditto: the global model as FedAvg; then the client's personal model v trains
  ``personal_epochs`` (1) epochs on CE + λ/2 ||v − w||², w the global model the client
  received, λ 1.

Accuracy is the simulator's headline ``accuracy`` of ``summary.json``: after the last round
each client's model (the global one for FedAvg; the client's own for Local and Ditto; the
global shared layers with the client's personal ones for FedPer, FedRep, LG-FedAvg) on its
own test set, Σ correct / Σ test samples over all clients.

    pip install -e ".[bench]"      # torch: a benchmark-only extra
    python experiments/reference_pytorch.py
    python experiments/reference_pytorch.py --rounds 2 --methods fedavg,local --seeds 0
    python experiments/reference_pytorch.py --lockstep --seeds 0

Prints a Markdown table (PyTorch mean ± std over seeds, fedjax-sim mean ± std, the
difference of the means in points); ``--json`` also writes every seed's numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import tempfile
import time

import numpy as np

METHODS = ("fedavg", "local", "fedper", "fedrep", "lg_fedavg", "ditto")

# The setting: digits, 20 clients, Dirichlet 0.1, 2NN MLP 64-200-200-10, SGD lr 0.05,
# batch 32, 2 local epochs, full participation.
SETTING = {"dataset": "digits", "num_clients": 20, "alpha": 0.1, "partition_seed": 0,
           "hidden": (200, 200), "lr": 0.05, "batch_size": 32, "local_epochs": 2}


def method_hparams(method: str) -> dict:
    """The hyperparameters of ``method`` as fedjax-sim resolves them for this setting.

    The setting's common values (lr, batch, local epochs, no momentum, no weight decay,
    full participation) with the method's own options at fedjax-sim's defaults (FedRep
    ``body_epochs``, LG-FedAvg ``lg_global_layers``, Ditto ``ditto_lambda`` and
    ``personal_epochs``). Both sides read this one dict.
    """
    from fedjax_sim import algorithms

    return algorithms.resolve(method, lr=SETTING["lr"], batch_size=SETTING["batch_size"],
                              local_epochs=SETTING["local_epochs"], momentum=0.0,
                              weight_decay=0.0, join_ratio=1.0)


# --------------------------------------------------------------------------------------
# Data: one partition file, read by both sides.


def draw_partition(path: str | os.PathLike) -> None:
    """Draws the setting's partition (seed 0) and saves it to ``path``."""
    from fedjax_sim.data import make_federated_data

    make_federated_data(SETTING["dataset"], num_clients=SETTING["num_clients"],
                        alpha=SETTING["alpha"], seed=SETTING["partition_seed"],
                        save_partition=path)


def load_data(path: str | os.PathLike):
    """The clients' padded arrays (``FederatedData``) of the partition file ``path``."""
    from fedjax_sim.data import make_federated_data

    data, _, _ = make_federated_data(SETTING["dataset"], partition_file=path)
    return data


def client_arrays(data) -> list[dict]:
    """Per client ``{"x", "y", "test_x", "test_y"}`` as PyTorch tensors (padding cut off)."""
    import torch

    clients = []
    for k in range(data.num_clients):
        n, t = int(data.train_counts[k]), int(data.test_counts[k])
        clients.append({
            "x": torch.from_numpy(np.asarray(data.train_x[k, :n], np.float32)).flatten(1),
            "y": torch.from_numpy(np.asarray(data.train_y[k, :n], np.int64)),
            "test_x": torch.from_numpy(np.asarray(data.test_x[k, :t], np.float32)).flatten(1),
            "test_y": torch.from_numpy(np.asarray(data.test_y[k, :t], np.int64)),
        })
    return clients


# --------------------------------------------------------------------------------------
# The PyTorch side.


def make_net(in_features: int, hidden, num_classes: int):
    """The 2NN: fc1 -> ReLU -> fc2 -> ReLU -> head, PyTorch's default initialization."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(in_features, hidden[0])
            self.fc2 = nn.Linear(hidden[0], hidden[1])
            self.head = nn.Linear(hidden[1], num_classes)

        def forward(self, x):
            x = torch.relu(self.fc1(x))
            x = torch.relu(self.fc2(x))
            return self.head(x)

    return Net()


def state_dict_of(params) -> dict:
    """fedjax-sim ``mlp`` parameters as the state dict of ``make_net``'s module (dense
    kernels (in, out) become ``weight`` (out, in))."""
    import torch

    return {f"{layer}.{name}": torch.from_numpy(np.array(
                np.asarray(leaves["kernel"]).T if name == "weight" else leaves["bias"],
                np.float32))
            for layer, leaves in params.items() for name in ("weight", "bias")}


def train_epochs(model, params, x, y, *, epochs: int, batch_size: int, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, penalty=None,
                 next_order=None) -> None:
    """``epochs`` epochs of SGD on ``params`` (a subset of ``model``'s), in place.

    Each epoch visits the client's samples in a fresh ``torch.randperm`` order, in batches
    of ``batch_size`` with the last one partial; the loss is the batch's mean
    cross-entropy, plus ``penalty(model)`` when given. A fresh ``torch.optim.SGD`` (no
    momentum state carried over), as fedjax-sim's ``core.local.train``. ``next_order``,
    ``n -> permutation of range(n)``, replaces ``torch.randperm`` if given.
    """
    import torch
    from torch.nn import functional as F

    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    n = len(y)
    for _ in range(epochs):
        order = (next_order or torch.randperm)(n)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[rows]), y[rows])
            if penalty is not None:
                loss = loss + penalty(model)
            loss.backward()
            optimizer.step()


def weighted_average(states: list[dict], weights: np.ndarray, keys) -> dict:
    """Σ_k w_k · states[k][key] for every ``key``, with w = weights / Σ weights."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return {key: sum(float(wk) * s[key] for wk, s in zip(w, states, strict=True))
            for key in keys}


def layer_keys(model, layers) -> list[str]:
    """State-dict keys of the top-level ``layers`` (``fc1`` -> ``fc1.weight``, ...)."""
    return [key for key in model.state_dict() if key.split(".")[0] in layers]


def count_correct(model, x, y) -> int:
    import torch

    model.eval()
    with torch.no_grad():
        return int((model(x).argmax(-1) == y).sum())


def fixed_orders(orders, counts):
    """``next_order`` for ``run_torch`` that reads host orders (R, K, E, N_max), e.g. from
    ``core.local.sample_batch_orders`` (what fedjax-sim's ``batch_order`` takes): round r,
    client k, epoch e visits ``orders[r % R, k, e, :n_k]``. For methods with one training
    phase of ``local_epochs`` per round (FedAvg, Local, FedPer, LG-FedAvg)."""
    import torch

    orders = np.asarray(orders)
    rounds, clients, epochs, _ = orders.shape

    def rows():
        r = 0
        while True:
            for k in range(clients):
                for e in range(epochs):
                    yield orders[r % rounds, k, e, :int(counts[k])]
            r += 1

    stream = rows()

    def next_order(n: int):
        row = next(stream)
        if len(row) != n:
            raise ValueError(f"fixed orders: expected a permutation of {n} samples, the next "
                             f"row has {len(row)} (orders do not fit this method's loop)")
        return torch.from_numpy(row.astype(np.int64))

    return next_order


def run_torch(method: str, clients: list[dict], *, seed: int, rounds: int, hparams: dict,
              num_classes: int, init_state: dict | None = None, next_order=None,
              return_models: bool = False):
    """Runs ``method`` for ``rounds`` rounds and returns the final accuracy (%).

    Args:
      method: one of ``METHODS``.
      clients: from ``client_arrays``.
      seed: ``torch.manual_seed`` before the initial model; the batch orders follow from
        the same generator.
      rounds: communication rounds (full participation).
      hparams: the method's hyperparameters as fedjax-sim resolves them
        (``method_hparams``): ``lr``, ``momentum``, ``weight_decay``, ``batch_size``,
        ``local_epochs`` and the method's own (``body_epochs``, ``lg_global_layers``,
        ``ditto_lambda``, ``personal_epochs``).
      num_classes: logits of the model.
      init_state: optional initial state dict (``fc1.weight``, ...) in place of the seeded
        initialization; with ``next_order``, for a step-by-step comparison.
      next_order: optional ``n -> permutation of range(n)`` in place of ``torch.randperm``,
        called once per epoch in the order of the loop: round, client, and within a
        client the phases in turn (FedRep: head, then base; Ditto: global, then
        personal), e.g. ``fixed_orders`` or the simulator's own (``lockstep``).
      return_models: also return the server's averaged parameters and every client's
        evaluated model.

    Returns:
      Σ correct / Σ test samples over the clients, in percent, each client on the model
      it uses (see the module docstring); with ``return_models``, ``(accuracy, server
      state dict (the averaged keys; empty for Local), [client k's evaluated state
      dict])``.
    """
    import torch

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    torch.manual_seed(seed)
    if hparams["local_steps"] is not None or hparams["join_ratio"] != 1.0:
        raise ValueError("run_torch runs local_epochs with full participation; got "
                         f"local_steps={hparams['local_steps']}, "
                         f"join_ratio={hparams['join_ratio']}")
    net = make_net(clients[0]["x"].shape[1], SETTING["hidden"], num_classes)
    if init_state is not None:
        net.load_state_dict(init_state)
    layers = ["fc1", "fc2", "head"]
    epochs = hparams["local_epochs"]
    sgd = {"batch_size": hparams["batch_size"], "lr": hparams["lr"],
           "momentum": hparams["momentum"], "weight_decay": hparams["weight_decay"],
           "next_order": next_order}
    counts = np.array([len(c["y"]) for c in clients])

    # Which top-level layers stay on the clients.
    if method in ("fedper", "fedrep"):
        personal = ["head"]
    elif method == "lg_fedavg":
        shared_n = hparams["lg_global_layers"] or 1  # unset: the head only
        personal = layers[:len(layers) - shared_n]
    elif method in ("local", "ditto"):
        personal = layers  # Ditto: a whole personal model besides the global one
    else:
        personal = []
    own_keys = layer_keys(net, personal)
    # Averaged at the server: Ditto's global model is FedAvg's, whole.
    shared_keys = [key for key in net.state_dict()
                   if method == "ditto" or key not in own_keys]
    # Every client's personal part starts from the common initial model.
    own = [{key: net.state_dict()[key].clone() for key in own_keys} for _ in clients]

    for _ in range(rounds):
        uploads = []
        for k, client in enumerate(clients):
            x, y = client["x"], client["y"]
            model = copy.deepcopy(net)
            if method == "ditto":
                # Global model: FedAvg's local training from the received w.
                train_epochs(model, list(model.parameters()), x, y, epochs=epochs, **sgd)
                uploads.append(copy.deepcopy(model.state_dict()))
                received = [p.detach().clone() for p in net.parameters()]
                lam = hparams["ditto_lambda"]

                def proximal(v, received=received, lam=lam):
                    return 0.5 * lam * sum(((p - w) ** 2).sum()
                                           for p, w in zip(v.parameters(), received,
                                                           strict=True))

                personal_model = copy.deepcopy(net)
                personal_model.load_state_dict(own[k])
                train_epochs(personal_model, list(personal_model.parameters()), x, y,
                             epochs=hparams["personal_epochs"], penalty=proximal, **sgd)
                own[k] = copy.deepcopy(personal_model.state_dict())
                continue
            model.load_state_dict(own[k], strict=False)
            if method == "fedrep":
                head = [p for name, p in model.named_parameters() if name.startswith("head.")]
                base = [p for name, p in model.named_parameters()
                        if not name.startswith("head.")]
                head_epochs = epochs - hparams["body_epochs"]
                if head_epochs > 0:
                    train_epochs(model, head, x, y, epochs=head_epochs, **sgd)
                train_epochs(model, base, x, y, epochs=hparams["body_epochs"], **sgd)
            else:
                train_epochs(model, list(model.parameters()), x, y, epochs=epochs, **sgd)
            state = model.state_dict()
            own[k] = {key: state[key].detach().clone() for key in own_keys}
            uploads.append({key: state[key].detach().clone() for key in shared_keys})
        if shared_keys:
            net.load_state_dict(weighted_average(uploads, counts, shared_keys), strict=False)

    correct = total = 0
    evaluated = []
    for k, client in enumerate(clients):
        model = copy.deepcopy(net)
        if method != "fedavg":
            model.load_state_dict(own[k], strict=False)
        correct += count_correct(model, client["test_x"], client["test_y"])
        total += len(client["test_y"])
        evaluated.append(model.state_dict())
    accuracy = 100.0 * correct / total
    if return_models:
        return accuracy, {key: net.state_dict()[key] for key in shared_keys}, evaluated
    return accuracy


# --------------------------------------------------------------------------------------
# The fedjax-sim side.


def run_fedjax(method: str, data, *, seeds: list[int], rounds: int, hparams: dict,
               output: str | os.PathLike | None = None) -> list[float]:
    """fedjax-sim's final-round ``accuracy`` (%) of ``method``, one per seed.

    The seeds run as one batched simulation (``runner.sweep``, what
    ``fedjax-sim run --seeds`` does) on ``data``, with ``init="torch"`` and ``hparams``
    (``method_hparams``).
    """
    from fedjax_sim.models import make_model
    from fedjax_sim.runner import sweep

    model = make_model("mlp", data.input_shape, data.num_classes, init="torch",
                       hidden=SETTING["hidden"])
    summaries = sweep(method, model, data, seeds=list(seeds), rounds=rounds,
                      eval_every=rounds, hparams=hparams, output=output, progress=False)
    accuracies = []
    for summary in summaries:
        if summary["status"] != "complete":
            raise RuntimeError(f"fedjax-sim {method} seed {summary['seed']}: "
                               f"{summary['status']}")
        accuracies.append(100.0 * summary["accuracy"])
    return accuracies


def lockstep(method: str, data, *, seed: int, rounds: int, hparams: dict) -> dict:
    """fedjax-sim's run of ``method`` and the PyTorch loop fed its random numbers.

    fedjax-sim runs ``rounds`` rounds from ``jax.random.key(seed)``; the PyTorch loop
    starts from the same initial weights and visits the samples in the same orders, which
    are read out of the compiled round: for the duration of the call
    ``core.local.batch_schedule`` is wrapped with an ordered ``jax.debug.callback`` that
    records every client's batch table, and the clients run one after another
    (``client_strategy="sequential"``), so the records arrive in the PyTorch loop's order.
    Any difference in semantics then shows as a difference in accuracy; float32 summation
    order alone rarely moves a prediction.

    Returns:
      ``{"method", "seed", "fedjax", "torch", "max_abs_diff", "max_abs_param"}``: both
      final accuracies (%), and the largest absolute difference between the two sides'
      parameters (the server's averaged ones and every client's evaluated model) with the
      largest absolute parameter, for scale.
    """
    import jax
    import torch

    from fedjax_sim import algorithms
    from fedjax_sim.core import local
    from fedjax_sim.core.evaluate import summarize
    from fedjax_sim.models import make_model

    model = make_model("mlp", data.input_shape, data.num_classes, init="torch",
                       hidden=SETTING["hidden"])
    records = []
    original = local.batch_schedule

    def recording(key, count, n_max, batch_size, **budget):
        index, weight, active = original(key, count, n_max, batch_size, **budget)
        jax.debug.callback(lambda i, c: records.append((int(c), np.asarray(i))), index,
                           count, ordered=True)
        return index, weight, active

    local.batch_schedule = recording
    try:
        alg = algorithms.make(method, model, **{**hparams, "client_strategy": "sequential"})
        state = alg.init(jax.random.key(seed), data)
        if state.server is not None:
            init = state.server["params"]
        else:  # Local: every client starts from the same model
            init = jax.tree.map(lambda a: a[0], state.clients["params"])
        init = jax.device_get(init)
        round_fn = jax.jit(alg.round)
        for _ in range(rounds):
            state, _ = round_fn(state, data)
        correct, _ = jax.jit(alg.evaluate)(state, data)
        jax.effects_barrier()
    finally:
        local.batch_schedule = original
    ours = 100.0 * summarize(np.asarray(correct), np.asarray(data.test_counts))["accuracy"]

    padded = -(-int(data.train_x.shape[1]) // hparams["batch_size"]) * hparams["batch_size"]
    perms = []
    for count, index in records:  # index: (epochs * steps per epoch, batch)
        flat = index.reshape(-1)
        perms += [flat[e * padded:e * padded + count] for e in range(flat.size // padded)]
    stream = iter(perms)

    def next_order(n: int):
        row = next(stream)
        if len(row) != n:
            raise RuntimeError(f"lockstep {method}: the simulator's next order has {len(row)} "
                               f"samples, the PyTorch loop asks for {n}")
        return torch.from_numpy(row.astype(np.int64))

    theirs, server, evaluated = run_torch(
        method, client_arrays(data), seed=seed, rounds=rounds, hparams=hparams,
        num_classes=data.num_classes, init_state=state_dict_of(init), next_order=next_order,
        return_models=True)
    left = sum(1 for _ in stream)
    if left:
        raise RuntimeError(f"lockstep {method}: the PyTorch loop used {len(perms) - left} of "
                           f"the simulator's {len(perms)} epoch orders")

    max_diff, max_param = parameter_gap(state, server, evaluated)
    return {"method": method, "seed": seed, "fedjax": ours, "torch": theirs,
            "max_abs_diff": max_diff, "max_abs_param": max_param}


def parameter_gap(state, server: dict, evaluated: list[dict]) -> tuple[float, float]:
    """How far ``run_torch``'s models (``return_models``) are from fedjax-sim's ``state``.

    Compared: the server's averaged parameters, and every client's evaluated model (the
    global one, the client's own, or the global one with the client's personal layers).

    Returns:
      ``(largest absolute difference, largest absolute parameter)``.
    """
    import jax

    final_server, final_clients = jax.device_get((state.server, state.clients))
    pairs = []
    if server:
        ours_server = state_dict_of(final_server["params"])
        pairs += [(ours_server[key], value) for key, value in server.items()]
    for k, model_k in enumerate(evaluated):
        params = dict(final_server["params"]) if final_server is not None else {}
        if final_clients is not None:
            own = jax.tree.map(lambda a, k=k: a[k], final_clients)
            params.update(own.get("params", own.get("personal", {})))
        ours_k = state_dict_of(params)
        pairs += [(ours_k[key], value) for key, value in model_k.items()]
    return (max(float((a - b).abs().max()) for a, b in pairs),
            max(float(b.abs().max()) for _, b in pairs))


# --------------------------------------------------------------------------------------


def compare(methods, seeds, rounds: int, partition_file: str | os.PathLike, *,
            output: str | os.PathLike | None = None, log=print) -> list[dict]:
    """Both sides for every method and seed on the partition in ``partition_file``.

    Returns:
      Per method ``{"method", "torch", "fedjax", "torch_s", "fedjax_s"}``: the per-seed
      final accuracies (%) of each side and each side's wall time in seconds.
    """
    data = load_data(partition_file)
    clients = client_arrays(data)
    rows = []
    for method in methods:
        hparams = method_hparams(method)
        tic = time.perf_counter()
        ours = run_fedjax(method, data, seeds=seeds, rounds=rounds, hparams=hparams,
                          output=None if output is None else pathlib.Path(output) / method)
        fedjax_s = time.perf_counter() - tic
        tic = time.perf_counter()
        theirs = [run_torch(method, clients, seed=s, rounds=rounds, hparams=hparams,
                            num_classes=data.num_classes) for s in seeds]
        torch_s = time.perf_counter() - tic
        row = {"method": method, "torch": theirs, "fedjax": ours, "torch_s": torch_s,
               "fedjax_s": fedjax_s}
        log(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table: mean ± std (population std over seeds) of each
    side and the difference of the means, fedjax-sim minus PyTorch, in points."""
    lines = ["| method | PyTorch % | fedjax-sim % | difference (points) |",
             "|---|---|---|---|"]
    for row in rows:
        a, b = np.asarray(row["torch"]), np.asarray(row["fedjax"])
        lines.append(f"| {row['method']} | {a.mean():.2f} ± {a.std():.2f} "
                     f"| {b.mean():.2f} ± {b.std():.2f} | {b.mean() - a.mean():+.2f} |")
    return "\n".join(lines)


def methods_and_seeds(args, known) -> tuple[list[str], list[int]]:
    """``--methods`` (each one of ``known``) and ``--seeds`` of a reference script."""
    methods = _parse_list(args.methods, str, "--methods")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"--methods must be among {', '.join(known)}, got {unknown[0]!r}")
    return methods, _parse_list(args.seeds, int, "--seeds")


def _parse_list(text: str, kind, label: str) -> list:
    values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(f"{label} must list at least one value, got {text!r}")
    return values


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--partition-file", default=None,
                        help="partition file to use; drawn (digits, 20 clients, Dirichlet "
                             "0.1, seed 0) and written there if missing (default: a "
                             "temporary file)")
    parser.add_argument("--output", default=None,
                        help="folder for fedjax-sim's results (one sweep per method)")
    parser.add_argument("--json", default=None, help="also write the per-seed rows here")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads (small matrices: 1 is fastest)")
    parser.add_argument("--lockstep", action="store_true",
                        help="instead: per method and seed, fedjax-sim's run and the PyTorch "
                             "loop fed its initial weights and batch orders (lockstep)")
    args = parser.parse_args(argv)
    methods, seeds = methods_and_seeds(args, METHODS)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be an integer >= 1, got {args.rounds}")

    import torch

    torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        path = pathlib.Path(args.partition_file or pathlib.Path(scratch) / "partition.json")
        if not path.exists():
            draw_partition(path)
        if args.lockstep:
            data = load_data(path)
            rows = []
            for method in methods:
                for seed in seeds:
                    rows.append(lockstep(method, data, seed=seed, rounds=args.rounds,
                                         hparams=method_hparams(method)))
                    print(json.dumps(rows[-1]), flush=True)
            print("\n| method | seed | fedjax-sim % | PyTorch, lockstep % | max abs param diff "
                  "| max abs param |\n|---|---|---|---|---|---|")
            for row in rows:
                print(f"| {row['method']} | {row['seed']} | {row['fedjax']:.2f} "
                      f"| {row['torch']:.2f} | {row['max_abs_diff']:.1e} "
                      f"| {row['max_abs_param']:.2f} |")
            return rows
        rows = compare(methods, seeds, args.rounds, path, output=args.output)
    wall = time.perf_counter() - start
    print(f"\ndigits, {SETTING['num_clients']} clients, Dirichlet α {SETTING['alpha']} "
          f"(partition seed {SETTING['partition_seed']}), mlp {SETTING['hidden']}, SGD lr "
          f"{SETTING['lr']}, batch {SETTING['batch_size']}, {SETTING['local_epochs']} local "
          f"epochs, {args.rounds} rounds, seeds {','.join(map(str, seeds))}; final-round "
          f"accuracy; {wall:.0f} s\n")
    print(markdown_table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"setting": {**SETTING, "rounds": args.rounds, "seeds": seeds}, "rows": rows,
             "wall_s": wall}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
