"""fedjax-sim against plain PyTorch implementations of Per-FedAvg, pFedMe, MOON and FedDyn.

The setting and helpers are those of ``experiments/reference_pytorch.py`` (digits, 20
clients, Dirichlet α 0.1, partition seed 0, saved once and read by both sides; 2NN MLP
64-200-200-10 with PyTorch's initialization on both sides, ``init="torch"``; SGD lr 0.05,
batch 32, 2 local epochs, full participation). Each method is written below as a short
PyTorch loop from its paper's update rules, the same rules the fedjax-sim module
docstrings give, with the method's fedjax-sim defaults except where noted:

- Per-FedAvg (FO and HF): α = lr = 0.05 (adaptation step), β = 0.05 (meta step; the
  default 0.001 barely moves the model in 50 rounds). Per local step three independent
  ``torch.randperm`` orders give the batches D, D', D'' (the step count per epoch is
  FedAvg's); w̃ = w − α ∇f(w; D), w ← w − β (I − α ∇²f(w; D'')) ∇f(w̃; D'), the
  Hessian-vector product by ``torch.func.jvp`` of ``torch.func.grad`` (HF) or dropped
  (FO). Evaluation: w − α ∇f_k(w) on the client's whole training set.
- pFedMe: λ 15, personal lr 0.01, K 5, β 1, η = lr. Every client, per batch: K steps
  θ ← θ − lr_p (∇f(θ; D) + λ (θ − w_k)) (θ starts at the global model each round and is
  carried across batches), then w_k ← w_k − η λ (w_k − θ); the server mixes
  w ← (1 − β) w + β Σ p_k w_k; clients are evaluated on θ_k.
- MOON: μ 1, τ 0.5. Loss CE + μ ℓ_con, ℓ_con = −log(e^{s_g/τ} / (e^{s_g/τ} + e^{s_p/τ})),
  s the cosine similarity of the representation (the head's input, fc2's ReLU output) to
  the global model's and to the client's previous local model's (initially the initial
  model); evaluated on the global model.
- FedDyn: α 0.01. Loss CE − ⟨g_k, θ⟩ + α/2 ||θ − θ_g||²; then g_k ← g_k − α (θ_k − θ_g);
  the server h ← h − α Σ p_k (θ_k − θ_g), θ ← mean − h / α; evaluated on θ.

The server means are sample-weighted (n_k / Σ n) on both sides. The two sides share no
random numbers (seeds vary the initialization and the batch orders), so they agree in
distribution, not step by step.

    python experiments/reference_pytorch_pfl_a.py
    python experiments/reference_pytorch_pfl_a.py --methods moon --rounds 2 --seeds 0
    python experiments/reference_pytorch_pfl_a.py --lockstep --seeds 0  # same random numbers
    python experiments/reference_pytorch_pfl_a.py --time-rounds 20   # round time vs FedAvg

Prints a Markdown table (PyTorch mean ± std over seeds, fedjax-sim mean ± std, the
difference of the means in points); ``--json`` also writes every seed's numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from reference_pytorch import (
    SETTING,
    client_arrays,
    count_correct,
    draw_partition,
    load_data,
    make_net,
    markdown_table,
    run_fedjax,
    state_dict_of,
    weighted_average,
)
from reference_pytorch import method_hparams as fedavg_hparams

# Rows of the table: (name, fedjax-sim algorithm, its options beyond the setting's).
METHODS = {
    "perfedavg_fo": ("perfedavg", {"perfedavg_variant": "fo", "perfedavg_beta": 0.05}),
    "perfedavg_hf": ("perfedavg", {"perfedavg_variant": "hf", "perfedavg_beta": 0.05}),
    "pfedme": ("pfedme", {}),
    "moon": ("moon", {}),
    "feddyn": ("feddyn", {}),
}


def method_hparams(method: str) -> dict:
    """The hyperparameters of ``method`` as fedjax-sim resolves them for this setting; both
    sides read this one dict."""
    from fedjax_sim import algorithms

    algorithm, extra = METHODS[method]
    return algorithms.resolve(algorithm, lr=SETTING["lr"], batch_size=SETTING["batch_size"],
                              local_epochs=SETTING["local_epochs"], momentum=0.0,
                              weight_decay=0.0, join_ratio=1.0, **extra)


# Where the sample orders come from: ``torch.randperm`` unless ``--lockstep`` replaces it
# with the orders fedjax-sim drew.
_NEXT_ORDER = {"fn": None}


def batches(n: int, batch_size: int):
    """One epoch's batches of a fresh order (``torch.randperm``), the last one partial."""
    import torch

    order = (_NEXT_ORDER["fn"] or torch.randperm)(n)
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def functional_loss(net):
    """``(params, x, y) -> mean cross-entropy`` of ``net`` at the parameter dict ``params``."""
    from torch.func import functional_call
    from torch.nn import functional as F

    def loss(params, x, y):
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    return loss


def params_of(net) -> dict:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def perfedavg_client(net, client, hp) -> dict:
    """Per-FedAvg local training from ``net``'s parameters; returns the new parameters."""
    from torch.func import grad, jvp

    loss = functional_loss(net)
    gradient = grad(loss)
    alpha, beta = hp["lr"], hp["perfedavg_beta"]
    hessian = hp["perfedavg_variant"] == "hf"
    x, y = client["x"], client["y"]
    w = params_of(net)
    # Stream by stream, each for every epoch (the order fedjax-sim draws them in).
    orders = [[batches(len(y), hp["batch_size"]) for _ in range(hp["local_epochs"])]
              for _ in range(3 if hessian else 2)]
    for epoch in range(hp["local_epochs"]):
        for rows in zip(*(stream[epoch] for stream in orders), strict=True):
            g = gradient(w, x[rows[0]], y[rows[0]])
            adapted = {k: w[k] - alpha * g[k] for k in w}
            meta = gradient(adapted, x[rows[1]], y[rows[1]])
            if hessian:
                third = (x[rows[2]], y[rows[2]])
                _, hv = jvp(lambda p, third=third: gradient(p, *third), (w,), (meta,))
                meta = {k: meta[k] - alpha * hv[k] for k in w}
            w = {k: w[k] - beta * meta[k] for k in w}
    return w


def pfedme_client(net, client, hp) -> tuple[dict, dict]:
    """pFedMe's local rounds from ``net``'s parameters: (local model w_k, personal θ_k)."""
    from torch.func import grad

    gradient = grad(functional_loss(net))
    lam, eta, personal_lr = hp["pfedme_lambda"], hp["lr"], hp["pfedme_personal_lr"]
    x, y = client["x"], client["y"]
    w = params_of(net)
    theta = {k: v.clone() for k, v in w.items()}
    for _ in range(hp["local_epochs"]):
        for rows in batches(len(y), hp["batch_size"]):
            for _ in range(hp["pfedme_k"]):
                g = gradient(theta, x[rows], y[rows])
                theta = {k: theta[k] - personal_lr * (g[k] + lam * (theta[k] - w[k]))
                         for k in w}
            w = {k: w[k] - eta * lam * (w[k] - theta[k]) for k in w}
    return w, theta


def representation(net, x):
    """The head's input: fc2's ReLU output."""
    import torch

    return torch.relu(net.fc2(torch.relu(net.fc1(x))))


def moon_client(net, prev_state, client, hp) -> dict:
    """MOON's local training from ``net``; returns the trained state dict."""
    import torch
    from torch.nn import functional as F

    model = copy.deepcopy(net)
    glob = copy.deepcopy(net)
    prev = copy.deepcopy(net)
    prev.load_state_dict(prev_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"])
    mu, tau = hp["moon_mu"], hp["moon_tau"]
    x, y = client["x"], client["y"]
    for _ in range(hp["local_epochs"]):
        for rows in batches(len(y), hp["batch_size"]):
            xb = x[rows]
            z = representation(model, xb)
            with torch.no_grad():
                z_glob, z_prev = representation(glob, xb), representation(prev, xb)
            pos = F.cosine_similarity(z, z_glob, dim=-1) / tau
            neg = F.cosine_similarity(z, z_prev, dim=-1) / tau
            contrastive = (torch.logsumexp(torch.stack([pos, neg]), 0) - pos).mean()
            loss = F.cross_entropy(model.head(z), y[rows]) + mu * contrastive
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return copy.deepcopy(model.state_dict())


def feddyn_client(net, state, client, hp) -> tuple[dict, dict]:
    """FedDyn's local training from ``net`` with gradient state ``state``: (trained state
    dict, new gradient state)."""
    import torch
    from torch.nn import functional as F

    model = copy.deepcopy(net)
    anchor = params_of(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"])
    alpha = hp["feddyn_alpha"]
    x, y = client["x"], client["y"]
    for _ in range(hp["local_epochs"]):
        for rows in batches(len(y), hp["batch_size"]):
            loss = F.cross_entropy(model(x[rows]), y[rows])
            for name, p in model.named_parameters():
                loss = loss - (state[name] * p).sum() \
                    + 0.5 * alpha * ((p - anchor[name]) ** 2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trained = params_of(model)
    new_state = {k: state[k] - alpha * (trained[k] - anchor[k]) for k in state}
    return copy.deepcopy(model.state_dict()), new_state


def run_torch(method: str, clients: list[dict], *, seed: int, rounds: int, hparams: dict,
              num_classes: int, init_state: dict | None = None, return_models: bool = False):
    """Runs ``method`` for ``rounds`` rounds (full participation).

    Args:
      init_state: optional initial state dict in place of the seeded initialization (the
        lockstep check).
      return_models: also return the final server state dict and pFedMe's personalized
        models (an empty list for the others).

    Returns:
      The final accuracy (%): Σ correct / Σ test samples, each client on the model it is
      evaluated on (see the module docstring); with ``return_models`` a tuple with the
      models.
    """
    import torch

    torch.manual_seed(seed)
    net = make_net(clients[0]["x"].shape[1], SETTING["hidden"], num_classes)
    if init_state is not None:
        net.load_state_dict(init_state)
    counts = np.array([len(c["y"]) for c in clients])
    keys = list(net.state_dict())
    zeros = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    prev = [copy.deepcopy(net.state_dict()) for _ in clients]  # MOON
    grads = [dict(zeros) for _ in clients]  # FedDyn
    h = dict(zeros)
    theta = [None] * len(clients)  # pFedMe
    for _ in range(rounds):
        uploads = []
        for k, client in enumerate(clients):
            if method.startswith("perfedavg"):
                uploads.append(perfedavg_client(net, client, hparams))
            elif method == "pfedme":
                w_k, theta[k] = pfedme_client(net, client, hparams)
                uploads.append(w_k)
            elif method == "moon":
                prev[k] = moon_client(net, prev[k], client, hparams)
                uploads.append(prev[k])
            else:
                trained, grads[k] = feddyn_client(net, grads[k], client, hparams)
                uploads.append(trained)
        mean = weighted_average(uploads, counts, keys)
        current = net.state_dict()
        if method == "pfedme":
            beta = hparams["pfedme_beta"]
            mean = {k: (1 - beta) * current[k] + beta * mean[k] for k in keys}
        elif method == "feddyn":
            alpha = hparams["feddyn_alpha"]  # full participation: Σ_P p_k = 1
            h = {k: h[k] - alpha * (mean[k] - current[k]) for k in keys}
            mean = {k: mean[k] - h[k] / alpha for k in keys}
        net.load_state_dict(mean)

    correct = total = 0
    gradient = None
    for k, client in enumerate(clients):
        model = copy.deepcopy(net)
        if method.startswith("perfedavg"):
            from torch.func import grad

            gradient = gradient or grad(functional_loss(net))
            w = params_of(net)
            g = gradient(w, client["x"], client["y"])
            model.load_state_dict({k_: w[k_] - hparams["lr"] * g[k_] for k_ in w})
        elif method == "pfedme":
            model.load_state_dict(theta[k])
        correct += count_correct(model, client["test_x"], client["test_y"])
        total += len(client["test_y"])
    if return_models:
        return 100.0 * correct / total, net.state_dict(), [t for t in theta if t is not None]
    return 100.0 * correct / total


def lockstep(method: str, data, *, seed: int, rounds: int) -> dict:
    """fedjax-sim's run of ``method`` and the PyTorch loop fed its initial weights and its
    sample orders (as ``reference_pytorch.lockstep``: ``core.local.batch_schedule`` wrapped
    with an ordered ``jax.debug.callback`` while the clients run one after another).

    Returns:
      ``{"method", "seed", "fedjax", "torch", "max_abs_diff", "max_abs_param"}``: both
      final accuracies (%) and the largest absolute difference between the two sides'
      server models (and pFedMe's personalized models), with the largest parameter.
    """
    import jax
    import torch

    from fedjax_sim import algorithms
    from fedjax_sim.core import local
    from fedjax_sim.core.evaluate import summarize
    from fedjax_sim.models import make_model

    hparams = method_hparams(method)
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
        alg = algorithms.make(METHODS[method][0], model,
                              **{**hparams, "client_strategy": "sequential"})
        state = alg.init(jax.random.key(seed), data)
        init = jax.device_get(state.server["params"])
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

    _NEXT_ORDER["fn"] = next_order
    try:
        theirs, server, thetas = run_torch(
            method, client_arrays(data), seed=seed, rounds=rounds, hparams=hparams,
            num_classes=data.num_classes, init_state=state_dict_of(init), return_models=True)
    finally:
        _NEXT_ORDER["fn"] = None
    left = sum(1 for _ in stream)
    if left:
        raise RuntimeError(f"lockstep {method}: the PyTorch loop used {len(perms) - left} of "
                           f"the simulator's {len(perms)} epoch orders")
    final = jax.device_get(state)
    pairs = [(state_dict_of(final.server["params"]), server)]
    if method == "pfedme":
        pairs += [(state_dict_of(jax.tree.map(lambda a, k=k: a[k], final.clients["theta"])),
                   theta) for k, theta in enumerate(thetas)]
    diffs = [float((ours_k[key] - theirs_k[key]).abs().max())
             for ours_k, theirs_k in pairs for key in theirs_k]
    scale = max(float(theirs_k[key].abs().max()) for _, theirs_k in pairs for key in theirs_k)
    return {"method": method, "seed": seed, "fedjax": ours, "torch": theirs,
            "max_abs_diff": max(diffs), "max_abs_param": scale}


def compare(methods, seeds, rounds: int, partition_file, *, log=print) -> list[dict]:
    """Both sides for every method and seed on the partition in ``partition_file``."""
    data = load_data(partition_file)
    clients = client_arrays(data)
    rows = []
    for method in methods:
        hparams = method_hparams(method)
        tic = time.perf_counter()
        ours = run_fedjax(METHODS[method][0], data, seeds=seeds, rounds=rounds,
                          hparams=hparams)
        fedjax_s = time.perf_counter() - tic
        tic = time.perf_counter()
        theirs = [run_torch(method, clients, seed=s, rounds=rounds, hparams=hparams,
                            num_classes=data.num_classes) for s in seeds]
        row = {"method": method, "torch": theirs, "fedjax": ours,
               "torch_s": time.perf_counter() - tic, "fedjax_s": fedjax_s}
        log(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def time_rounds(methods, rounds: int, partition_file, *, repeats: int = 3,
                log=print) -> list[dict]:
    """fedjax-sim's time per round of each method against FedAvg's on this setting
    (``round_cost.round_times``: compiled first, interleaved, fastest repeat).

    Returns:
      Per algorithm ``{"method", "round_ms", "ratio"}``: milliseconds per round and the
      median ratio to FedAvg's.
    """
    from round_cost import round_times

    from fedjax_sim.models import make_model

    data = load_data(partition_file)
    model = make_model("mlp", data.input_shape, data.num_classes, init="torch",
                       hidden=SETTING["hidden"])
    configs = [("fedavg", "fedavg", fedavg_hparams("fedavg"))]
    configs += [(m, METHODS[m][0], method_hparams(m)) for m in methods]
    rows = [{"method": row["config"], "round_ms": row["ms"], "ratio": row["ratio"]}
            for row in round_times(configs, data, model, rounds=rounds, repeats=repeats)]
    for row in rows:
        log(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--partition-file", default=None,
                        help="partition file; drawn there if missing (default: temporary)")
    parser.add_argument("--json", default=None, help="also write the per-seed rows here")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--lockstep", action="store_true",
                        help="instead: per method and seed, fedjax-sim's run and the PyTorch "
                             "loop fed its initial weights and sample orders")
    parser.add_argument("--time-rounds", type=int, default=0,
                        help="instead: time this many fedjax-sim rounds of each method and "
                             "of FedAvg (best of 3, interleaved) and print the ratios")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"--methods must list names among {', '.join(METHODS)}, got "
                         f"{args.methods!r}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise ValueError(f"--seeds must list at least one seed, got {args.seeds!r}")
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
                    rows.append(lockstep(method, data, seed=seed, rounds=args.rounds))
                    print(json.dumps(rows[-1]), flush=True)
            print("\n| method | seed | fedjax-sim % | PyTorch, lockstep % | max abs param diff "
                  "| max abs param |\n|---|---|---|---|---|---|")
            for row in rows:
                print(f"| {row['method']} | {row['seed']} | {row['fedjax']:.2f} "
                      f"| {row['torch']:.2f} | {row['max_abs_diff']:.1e} "
                      f"| {row['max_abs_param']:.2f} |")
            return rows
        if args.time_rounds:
            rows = time_rounds(methods, args.time_rounds, path)
            print("\n| method | ms per round | ratio to FedAvg |\n|---|---|---|")
            for row in rows:
                print(f"| {row['method']} | {row['round_ms']:.1f} | {row['ratio']:.2f} |")
            return rows
        rows = compare(methods, seeds, args.rounds, path)
    wall = time.perf_counter() - start
    print(f"\ndigits, {SETTING['num_clients']} clients, Dirichlet α {SETTING['alpha']} "
          f"(partition seed {SETTING['partition_seed']}), mlp {SETTING['hidden']}, lr "
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
