"""fedjax-sim against plain PyTorch implementations of FedRoD, FedProto, FedAMP and FedALA.

The setting, the partition and the fedjax-sim side are those of
``experiments/reference_pytorch.py`` (digits, 20 clients, Dirichlet α 0.1, partition seed
0, 2NN MLP 64-200-200-10 with PyTorch's initialization on both sides, SGD lr 0.05, batch
32, 2 local epochs, full participation, 50 rounds); its helpers are imported, not copied.
Each method's PyTorch side is written below from the method's rules (the module docstrings
of ``fedjax_sim.algorithms.fedrod``, ``fedproto``, ``fedamp``, ``fedala``), with the
hyperparameters fedjax-sim resolves for the method at its defaults:

- FedRoD: per batch, loss = balanced softmax of the generic logits (class counts^γ, γ 1)
  + cross-entropy of (generic logits, detached) + personal head (on the detached
  features); one ``torch.optim.SGD`` over the model and the personal head; the server
  averages the model; evaluation: generic + personal logits with the global model.
- FedProto: every client keeps its model; loss = cross-entropy + λ · MSE(features, global
  prototype of the label) where one exists (λ 1); after training the client's class-mean
  features go to the server, which averages them per class over the clients holding the
  class; evaluation: nearest global prototype.
- FedAMP: ξ_kj = α exp(−||w_k − w_j||²/σ)/σ (j ≠ k), ξ_kk = 1 − Σ; u_k = Σ_j ξ_kj w_j;
  the client trains from u_k on cross-entropy + λ/(2α)||w − u_k||²; evaluation: w_k.
- FedALA: the received global model's lower layers, and for the head W ⊙ global + (1 − W)
  ⊙ local, W learned on a random 80% of the client's data (one pass per round; the first
  aggregation until the std of the last 10 pass losses is below 0.1, at most 100 passes)
  with W ← clip(W − η ∇ ⊙ (global − local), 0, 1); then local SGD; the server averages;
  evaluation: the client's trained model. Skipped while the client's model equals the
  global one.

    python experiments/reference_pytorch_pfl_b.py
    python experiments/reference_pytorch_pfl_b.py --methods fedamp --rounds 5 --seeds 0
    python experiments/reference_pytorch_pfl_b.py --round-times --rounds 10

Prints the Markdown table of ``reference_pytorch.markdown_table`` (PyTorch mean ± std over
seeds, fedjax-sim mean ± std, difference in points); ``--json`` writes every seed.
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
    method_hparams,
    methods_and_seeds,
    run_fedjax,
    weighted_average,
)

METHODS = ("fedrod", "fedproto", "fedamp", "fedala")


def features(net, x):
    """The 2NN's representation: the head's input."""
    import torch

    return torch.relu(net.fc2(torch.relu(net.fc1(x))))


def batches(n: int, batch_size: int, order=None):
    """Row blocks of one epoch over ``n`` samples: a fresh ``torch.randperm`` (or
    ``order``) cut into batches of ``batch_size``, the last one partial."""
    import torch

    order = torch.randperm(n) if order is None else order
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def sgd_epochs(params, loss_of, n, *, epochs, hp):
    """``epochs`` epochs of plain SGD on ``params``, ``loss_of(rows)`` the batch loss."""
    import torch

    optimizer = torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"],
                                weight_decay=hp["weight_decay"])
    for _ in range(epochs):
        for rows in batches(n, hp["batch_size"]):
            optimizer.zero_grad()
            loss_of(rows).backward()
            optimizer.step()


def run_fedrod(clients, net, hp, rounds):
    import torch
    from torch.nn import functional as F

    counts = np.array([len(c["y"]) for c in clients])
    heads = [copy.deepcopy(net.head) for _ in clients]
    classes = net.head.out_features
    for _ in range(rounds):
        uploads = []
        for k, c in enumerate(clients):
            model, head = copy.deepcopy(net), heads[k]
            n_c = torch.bincount(c["y"], minlength=classes).float()
            offset = torch.where(n_c > 0, hp["fedrod_gamma"] * torch.log(n_c.clamp(min=1)),
                                 torch.tensor(-1e30 if hp["fedrod_gamma"] > 0 else 0.0))

            def loss_of(rows, model=model, head=head, c=c, offset=offset):
                z = features(model, c["x"][rows])
                g = model.head(z)
                generic = F.cross_entropy(g + offset, c["y"][rows])
                personal = F.cross_entropy(g.detach() + head(z.detach()), c["y"][rows])
                return generic + personal

            sgd_epochs(list(model.parameters()) + list(head.parameters()), loss_of,
                       len(c["y"]), epochs=hp["local_epochs"], hp=hp)
            uploads.append(copy.deepcopy(model.state_dict()))
        net.load_state_dict(weighted_average(uploads, counts, list(net.state_dict())))
    correct = total = 0
    with torch.no_grad():
        for k, c in enumerate(clients):
            z = features(net, c["test_x"])
            pred = (net.head(z) + heads[k](z)).argmax(-1)
            correct += int((pred == c["test_y"]).sum())
            total += len(c["test_y"])
    return 100.0 * correct / total


def run_fedproto(clients, net, hp, rounds):
    import torch
    from torch.nn import functional as F

    models = [copy.deepcopy(net) for _ in clients]
    classes = net.head.out_features
    protos = {}
    for _ in range(rounds):
        local = []
        table = torch.stack([protos[j] if j in protos else torch.zeros(net.head.in_features)
                             for j in range(classes)])
        known = torch.tensor([j in protos for j in range(classes)])
        for k, c in enumerate(clients):
            model = models[k]

            def loss_of(rows, model=model, c=c, table=table, known=known, any_=bool(protos)):
                x, y = c["x"][rows], c["y"][rows]
                z = features(model, x)
                loss = F.cross_entropy(model.head(z), y)
                if any_:
                    target = torch.where(known[y][:, None], table[y], z.detach())
                    loss = loss + hp["fedproto_lambda"] * F.mse_loss(z, target)
                return loss

            sgd_epochs(list(model.parameters()), loss_of, len(c["y"]),
                       epochs=hp["local_epochs"], hp=hp)
            with torch.no_grad():
                z = features(model, c["x"])
                local.append({j: z[c["y"] == j].mean(0) for j in range(classes)
                              if bool((c["y"] == j).any())})
        protos = {j: torch.stack([p[j] for p in local if j in p]).mean(0)
                  for j in range(classes) if any(j in p for p in local)}
    correct = total = 0
    with torch.no_grad():
        table = torch.stack([protos.get(j, torch.zeros_like(next(iter(protos.values()))))
                             for j in range(classes)])
        known = torch.tensor([j in protos for j in range(classes)])
        for k, c in enumerate(clients):
            z = features(models[k], c["test_x"])
            d = ((z[:, None, :] - table[None]) ** 2).sum(-1)
            d[:, ~known] = float("inf")
            correct += int((d.argmin(-1) == c["test_y"]).sum())
            total += len(c["test_y"])
    return 100.0 * correct / total


def run_fedamp(clients, net, hp, rounds):
    import torch
    from torch.nn import functional as F

    alpha, lam, sigma = hp["fedamp_alpha"], hp["fedamp_lambda"], hp["fedamp_sigma"]
    models = [copy.deepcopy(net) for _ in clients]
    for _ in range(rounds):
        with torch.no_grad():
            flat = torch.stack([torch.cat([p.reshape(-1) for p in m.parameters()])
                                for m in models]).double()
            d = torch.cdist(flat, flat) ** 2
            xi = alpha * torch.exp(-d / sigma) / sigma
            xi.fill_diagonal_(0.0)
            xi += torch.diag(1.0 - xi.sum(1))
            clouds = (xi @ flat).float()
        new = []
        for k, c in enumerate(clients):
            model = copy.deepcopy(models[k])
            torch.nn.utils.vector_to_parameters(clouds[k], model.parameters())
            anchor = [p.detach().clone() for p in model.parameters()]

            def loss_of(rows, model=model, c=c, anchor=anchor):
                gap = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor,
                                                               strict=True))
                return F.cross_entropy(model(c["x"][rows]), c["y"][rows]) + \
                    lam / (2 * alpha) * gap

            sgd_epochs(list(model.parameters()), loss_of, len(c["y"]),
                       epochs=hp["local_epochs"], hp=hp)
            new.append(model)
        models = new
    correct = sum(count_correct(m, c["test_x"], c["test_y"]) for m, c in zip(models, clients,
                                                                            strict=True))
    return 100.0 * correct / sum(len(c["test_y"]) for c in clients)


def run_fedala(clients, net, hp, rounds):
    import torch
    from torch.nn import functional as F

    eta, ratio = hp["fedala_eta"], hp["fedala_sample_ratio"]
    memory, threshold = hp["fedala_num_pre_loss"], hp["fedala_threshold"]
    top = ["fc1", "fc2", "head"][-hp["fedala_layers"]:]
    counts = np.array([len(c["y"]) for c in clients])
    models = [copy.deepcopy(net) for _ in clients]
    weights = [{name: torch.ones_like(p) for name, p in net.named_parameters()
                if name.split(".")[0] in top} for _ in clients]
    started = [False] * len(clients)
    for _ in range(rounds):
        uploads = []
        glob = {name: p.detach().clone() for name, p in net.named_parameters()}
        for k, c in enumerate(clients):
            own = {name: p.detach().clone() for name, p in models[k].named_parameters()}
            start = copy.deepcopy(net)
            if not all(torch.equal(own[n], glob[n]) for n in glob):
                n = len(c["y"])
                m = max(1, int(ratio * n))
                sample = torch.randperm(n)[:m]
                temp = copy.deepcopy(net)
                params = dict(temp.named_parameters())
                w = weights[k]

                def mix(w=w, own=own, params=params, glob=glob):
                    with torch.no_grad():
                        for name in w:
                            params[name].copy_(w[name] * glob[name] +
                                               (1 - w[name]) * own[name])

                mix()
                losses = []
                while True:
                    for rows in batches(m, hp["batch_size"], order=sample):
                        temp.zero_grad()
                        loss = F.cross_entropy(temp(c["x"][rows]), c["y"][rows])
                        loss.backward()
                        with torch.no_grad():
                            for name in w:
                                w[name] = torch.clamp(w[name] - eta * params[name].grad *
                                                      (glob[name] - own[name]), 0, 1)
                        mix()
                    losses.append(loss.item())
                    if started[k] or len(losses) >= hp["fedala_max_start_epochs"]:
                        break
                    if len(losses) > memory and np.std(losses[-memory:]) < threshold:
                        break
                started[k] = True
                start.load_state_dict(temp.state_dict())
            model = start
            sgd_epochs(list(model.parameters()),
                       lambda rows, model=model, c=c: F.cross_entropy(model(c["x"][rows]),
                                                                      c["y"][rows]),
                       len(c["y"]), epochs=hp["local_epochs"], hp=hp)
            models[k] = model
            uploads.append(copy.deepcopy(model.state_dict()))
        net.load_state_dict(weighted_average(uploads, counts, list(net.state_dict())))
    correct = sum(count_correct(m, c["test_x"], c["test_y"]) for m, c in zip(models, clients,
                                                                            strict=True))
    return 100.0 * correct / sum(len(c["test_y"]) for c in clients)


RUNNERS = {"fedrod": run_fedrod, "fedproto": run_fedproto, "fedamp": run_fedamp,
           "fedala": run_fedala}


def run_torch(method: str, clients: list[dict], *, seed: int, rounds: int, hparams: dict,
              num_classes: int) -> float:
    """``method`` in PyTorch for ``rounds`` rounds (full participation): the final
    accuracy (%), Σ correct / Σ test samples over the clients."""
    import torch

    if hparams["local_steps"] is not None or hparams["join_ratio"] != 1.0:
        raise ValueError("run_torch runs local_epochs with full participation")
    torch.manual_seed(seed)
    net = make_net(clients[0]["x"].shape[1], SETTING["hidden"], num_classes)
    return RUNNERS[method](clients, net, hparams, rounds)


def round_times(methods, data, *, rounds: int, repeats: int) -> list[dict]:
    """fedjax-sim's time per round of each method against FedAvg's on the setting
    (``round_cost.round_times``: compiled first, interleaved, fastest repeat and median
    ratio)."""
    from round_cost import round_times as timed

    from fedjax_sim.models import make_model

    model = make_model("mlp", data.input_shape, data.num_classes, init="torch",
                       hidden=SETTING["hidden"])
    configs = [(m, m, method_hparams(m)) for m in ("fedavg", *methods)]
    return [{"method": row["config"], **row}
            for row in timed(configs, data, model, rounds=rounds, repeats=repeats)]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", default=None, help="also write the per-seed rows here")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--round-times", action="store_true",
                        help="instead: fedjax-sim's time per round of each method against "
                             "FedAvg's on the setting (--rounds rounds, 15 repeats)")
    args = parser.parse_args(argv)
    methods, seeds = methods_and_seeds(args, METHODS)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be an integer >= 1, got {args.rounds}")

    import torch

    torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        path = pathlib.Path(scratch) / "partition.json"
        draw_partition(path)
        data = load_data(path)
        if args.round_times:
            rows = round_times(methods, data, rounds=args.rounds, repeats=15)
            print("| method | ms / round (fastest) | × FedAvg (median) |\n|---|---|---|")
            for row in rows:
                print(f"| {row['method']} | {row['ms']:.1f} | {row['ratio']:.2f} |")
            return rows
        clients = client_arrays(data)
        for method in methods:
            hparams = method_hparams(method)
            tic = time.perf_counter()
            ours = run_fedjax(method, data, seeds=seeds, rounds=args.rounds, hparams=hparams)
            fedjax_s = time.perf_counter() - tic
            tic = time.perf_counter()
            theirs = [run_torch(method, clients, seed=s, rounds=args.rounds, hparams=hparams,
                                num_classes=data.num_classes) for s in seeds]
            row = {"method": method, "torch": theirs, "fedjax": ours,
                   "torch_s": time.perf_counter() - tic, "fedjax_s": fedjax_s}
            print(json.dumps(row), flush=True)
            rows.append(row)
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
