"""FedBN and FedAvg on cnn_bn: fedjax-sim against a plain PyTorch implementation.

The setting is ``fedjax-sim run --model cnn_bn --dataset digits`` at its defaults, read
from ``fedjax_sim.spec.ExperimentSpec`` (20 clients, Dirichlet α 0.1, test ratio 0.25,
PyTorch initialization, 30 rounds; the common hyperparameters of ``algorithms.resolve``:
SGD lr 0.01, batch 32, 5 local epochs, full participation), on one split: the partition
of seed 0, the split of ``fedjax-sim run --seed 0`` (``--partition-seed 0`` for the
other seeds). Both sides read the same client arrays (``spec.build_data``) and start
from the same weights: the PyTorch network loads fedjax-sim's initial parameters of the
seed (``Algorithm.init(jax.random.key(seed))``, what ``runner.run`` starts from). Seeds
vary the initialization and the batch orders; the two sides draw their batch orders from
their own generators, so they agree in distribution, not step by step. The helpers of
``experiments/reference_pytorch.py`` (SGD epochs, sample-weighted averaging, counting,
parsing) are imported, not copied.

The PyTorch network: Conv2d(1, 32, 5) -> BatchNorm2d -> ReLU -> MaxPool2d(2) ->
Conv2d(32, 64, 5) -> BatchNorm2d -> ReLU -> MaxPool2d(2) -> Linear(256, 512) ->
BatchNorm1d -> ReLU -> Linear(512, 10), SAME padding (2) on the 8x8 digits as fedjax-sim's
``padding="auto"``; BatchNorm momentum 0.1, eps 1e-5. In training mode both sides
normalize with the batch's mean and biased variance; they differ in the running variance
(used at evaluation): PyTorch moves it towards the batch's unbiased variance (n / (n - 1)
times the biased one, n the values per channel: the batch's rows for bn3, rows x H x W for
bn1, bn2), flax and so fedjax-sim towards the biased one. ``--running-var unbiased``
(default) keeps PyTorch's own ``nn.BatchNorm`` forward; ``--running-var biased`` replaces
the running-variance update by flax's. A training batch of one row (the last, partial
batch of a client with n_k = 1 mod 32) has one value per channel in bn3, which
``nn.BatchNorm1d`` refuses in training mode; there both settings use the written-out
update with the biased variance, 0, as flax does (the normalized output is the BN bias).

Methods (per round and client: a copy of the global model with the client's own layers
loaded, ``torch.optim.SGD`` over ``torch.randperm`` batches, the last one partial; the
server takes the sample-weighted mean n_k / Σ n of the shared entries, the BN running
statistics included; ``num_batches_tracked`` is never used with a fixed momentum and is
not averaged):

- ``fedavg``: every entry shared.
- ``fedbn``: the BN layers' weight, bias, running_mean and running_var of bn1, bn2 and bn3
  stay on the client (``fedjax_sim.algorithms.fedbn``).
- ``fedbn_conv`` (ablation): only bn1 and bn2 stay on the client; bn3, the BN in front of
  the shared head, is averaged like the other layers. fedjax-sim side: the registered
  FedBN's round skeleton (``partial.decoupled`` with plain local SGD) on the same network,
  whose running statistics are regrouped so that bn3's are a top-level entry of their own.
- ``local``: nothing shared; every client trains its own copy of the initial model.

Accuracy is fedjax-sim's headline ``accuracy``: after the last round every client's model
(running statistics, evaluation mode) on its own test set, Σ correct / Σ test samples.

    pip install -e ".[bench]"      # torch: a benchmark-only extra
    python experiments/reference_pytorch_fedbn.py
    python experiments/reference_pytorch_fedbn.py --methods local,fedavg,fedbn,fedbn_conv \\
        --alphas 0.1,0.5,100
    python experiments/reference_pytorch_fedbn.py --rounds 2 --seeds 0 --side both

Prints one Markdown table (per α and method: PyTorch mean ± std over seeds, fedjax-sim
mean ± std, difference of the means in points); ``--json`` also writes every seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from reference_pytorch import (
    _parse_list,
    count_correct,
    methods_and_seeds,
    train_epochs,
    weighted_average,
)

METHODS = ("fedavg", "fedbn", "fedbn_conv", "local")
NORMS = ("bn1", "bn2", "bn3")
# Top-level layers each method keeps on the clients (PyTorch module names).
PERSONAL = {"fedavg": (), "fedbn": NORMS, "fedbn_conv": ("bn1", "bn2"),
            "local": ("conv1", "bn1", "conv2", "bn2", "fc1", "bn3", "head")}
SIDES = ("both", "torch", "fedjax")
RUNNING_VARS = ("unbiased", "biased")


def default_spec(alpha: float | None = None):
    """``fedjax-sim run --model cnn_bn --dataset digits --partition-seed 0`` at its
    defaults, with Dirichlet ``alpha`` when given."""
    from fedjax_sim.spec import ExperimentSpec

    extra = {} if alpha is None else {"alpha": float(alpha)}
    return ExperimentSpec(model="cnn_bn", dataset="digits", partition_seed=0, **extra)


def setting(spec) -> dict:
    """The run settings both sides use: the spec's data and loop defaults and the common
    hyperparameters fedjax-sim resolves at their defaults."""
    from fedjax_sim import algorithms
    from fedjax_sim.data import DEFAULT_NUM_CLIENTS

    hp = algorithms.resolve("fedavg")
    return {"dataset": spec.dataset, "model": spec.model,
            "num_clients": spec.num_clients or DEFAULT_NUM_CLIENTS,
            "alpha": spec.alpha, "partition_seed": spec.data_seed,
            "test_ratio": spec.test_ratio, "init": spec.init, "rounds": spec.rounds,
            "lr": hp["lr"], "batch_size": hp["batch_size"],
            "local_epochs": hp["local_epochs"], "momentum": hp["momentum"],
            "weight_decay": hp["weight_decay"], "join_ratio": hp["join_ratio"]}


def build(spec):
    """``(data, model)``: the clients' arrays and the cnn_bn of ``spec``, as
    ``fedjax-sim run`` builds them."""
    from fedjax_sim.spec import build_data, build_model

    data, _ = build_data(spec)
    return data, build_model(spec, data.input_shape, data.num_classes, data)


# --------------------------------------------------------------------------------------
# The fedjax-sim side.


def split_bn3_stats(model):
    """``model`` (cnn_bn) with bn3's running statistics moved out of ``batch_stats`` into
    a top-level entry ``bn3_stats`` of their own (``state_names`` both), so that a
    layer-wise split can keep bn1, bn2 on the clients and share bn3. Same function, same
    floats: only the dict is regrouped."""
    import dataclasses

    def wrap(params):
        stats = dict(params["batch_stats"])
        bn3 = stats.pop("bn3")
        return {**{k: v for k, v in params.items() if k != "batch_stats"},
                "batch_stats": stats, "bn3_stats": {"bn3": bn3}}

    def unwrap(params):
        stats = {**params["batch_stats"], **params["bn3_stats"]}
        return {**{k: v for k, v in params.items() if k not in ("batch_stats", "bn3_stats")},
                "batch_stats": stats}

    def train_fn(params, x, weights):
        logits, new = model.train(unwrap(params), x, weights)
        regrouped = wrap({"batch_stats": new["batch_stats"]})
        return logits, {"batch_stats": regrouped["batch_stats"],
                        "bn3_stats": regrouped["bn3_stats"]}

    return dataclasses.replace(
        model, name=model.name, init_fn=lambda key: wrap(model.init(key)),
        apply_fn=lambda params, x: model.apply(unwrap(params), x), train_fn=train_fn,
        state_names=("batch_stats", "bn3_stats"))


def make_algorithm(method: str, model):
    """fedjax-sim's algorithm for ``method`` at its defaults on ``model`` (cnn_bn)."""
    from fedjax_sim import algorithms
    from fedjax_sim.algorithms.partial import decoupled, plain_sgd

    if method != "fedbn_conv":
        return algorithms.make(method, model)
    regrouped = split_bn3_stats(model)
    return decoupled("fedbn", regrouped, algorithms.resolve("fedbn"),
                     ("bn1", "bn2", "batch_stats"), plain_sgd(regrouped))


def initial_params(alg, data, seed: int) -> dict:
    """The parameters ``runner.run(alg, data, seed=seed)`` starts from (the server's
    model, or client 0's where every client holds one: Local), cnn_bn's layout."""
    import jax

    state = alg.init(jax.random.key(seed), data)
    if state.server is not None and "params" in state.server:
        params = state.server["params"]
    else:
        params = jax.tree.map(lambda a: a[0], state.clients["params"])
    params = dict(jax.device_get(params))
    if "bn3_stats" in params:  # regrouped (fedbn_conv): back to cnn_bn's layout
        params["batch_stats"] = {**params["batch_stats"], **params.pop("bn3_stats")}
    return params


def run_fedjax(method: str, data, model, *, seed: int, rounds: int) -> dict:
    """fedjax-sim's run (``runner.run``, evaluated after the last round): its summary's
    ``accuracy``, ``client_mean_accuracy`` and ``client_p10`` in percent."""
    from fedjax_sim import runner

    result = runner.run(make_algorithm(method, model), data, rounds=rounds,
                        eval_every=rounds, seed=seed, progress=False)
    summary = result.summary
    if summary["status"] != "complete":
        raise RuntimeError(f"fedjax-sim {method} seed {seed}: {summary['status']}")
    return {key: 100.0 * summary[key]
            for key in ("accuracy", "client_mean_accuracy", "client_p10")}


# --------------------------------------------------------------------------------------
# The PyTorch side.


def make_net(num_classes: int, *, channels: int = 1, padding: int = 2, flat: int = 256,
             running_var: str = "unbiased"):
    """cnn_bn in PyTorch (see the module docstring), default initialization; ``padding``
    of both convolutions (2: SAME), ``flat`` the input width of fc1."""
    import torch
    from torch import nn

    if running_var not in RUNNING_VARS:
        raise ValueError(f"running_var must be one of {RUNNING_VARS}, got {running_var!r}")

    class Norm:
        """PyTorch's BatchNorm forward, except the running-variance update where
        ``running_var == "biased"`` or a batch has one value per channel."""

        def forward(self, x):
            per_channel = x.numel() // x.shape[1]
            if not self.training or (running_var == "unbiased" and per_channel > 1):
                return super().forward(x)
            dims = (0, *range(2, x.dim()))
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
            shape = (1, -1, *([1] * (x.dim() - 2)))
            return ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
                    * self.weight.view(shape) + self.bias.view(shape))

    class Norm2d(Norm, nn.BatchNorm2d):
        pass

    class Norm1d(Norm, nn.BatchNorm1d):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, 32, 5, padding=padding)
            self.bn1 = Norm2d(32, eps=1e-5, momentum=0.1)
            self.conv2 = nn.Conv2d(32, 64, 5, padding=padding)
            self.bn2 = Norm2d(64, eps=1e-5, momentum=0.1)
            self.fc1 = nn.Linear(flat, 512)
            self.bn3 = Norm1d(512, eps=1e-5, momentum=0.1)
            self.head = nn.Linear(512, num_classes)

        def forward(self, x):
            pool = nn.functional.max_pool2d
            x = pool(torch.relu(self.bn1(self.conv1(x))), 2)
            x = pool(torch.relu(self.bn2(self.conv2(x))), 2)
            x = torch.relu(self.bn3(self.fc1(x.flatten(1))))
            return self.head(x)

    return Net()


def state_dict_of(params: dict) -> dict:
    """fedjax-sim cnn_bn parameters as ``make_net``'s state dict: conv kernels (kh, kw,
    in, out) -> (out, in, kh, kw); fc1's rows from flax's (h, w, c) flattening order to
    PyTorch's (c, h, w); dense kernels transposed; BN scale / bias -> weight / bias and
    the running mean / var."""
    import torch

    def t(a):
        return torch.from_numpy(np.array(a, np.float32))

    out = {}
    for layer in ("conv1", "conv2"):
        out[f"{layer}.weight"] = t(np.transpose(params[layer]["kernel"], (3, 2, 0, 1)))
        out[f"{layer}.bias"] = t(params[layer]["bias"])
    fc1 = np.asarray(params["fc1"]["kernel"])  # (h * w * c, 512)
    c = np.asarray(params["conv2"]["kernel"]).shape[-1]
    side = math.isqrt(fc1.shape[0] // c)
    out["fc1.weight"] = t(fc1.reshape(side, side, c, -1).transpose(3, 2, 0, 1)
                          .reshape(fc1.shape[1], -1))
    out["fc1.bias"] = t(params["fc1"]["bias"])
    out["head.weight"] = t(np.asarray(params["head"]["kernel"]).T)
    out["head.bias"] = t(params["head"]["bias"])
    for layer in NORMS:
        out[f"{layer}.weight"] = t(params[layer]["scale"])
        out[f"{layer}.bias"] = t(params[layer]["bias"])
        out[f"{layer}.running_mean"] = t(params["batch_stats"][layer]["mean"])
        out[f"{layer}.running_var"] = t(params["batch_stats"][layer]["var"])
    return out


def client_images(data) -> list[dict]:
    """Per client ``{"x", "y", "test_x", "test_y"}``, images NCHW, padding cut off."""
    import torch

    def images(a):
        return torch.from_numpy(np.ascontiguousarray(
            np.transpose(np.asarray(a, np.float32), (0, 3, 1, 2))))

    clients = []
    for k in range(data.num_clients):
        n, m = int(data.train_counts[k]), int(data.test_counts[k])
        clients.append({"x": images(data.train_x[k, :n]),
                        "y": torch.from_numpy(np.asarray(data.train_y[k, :n], np.int64)),
                        "test_x": images(data.test_x[k, :m]),
                        "test_y": torch.from_numpy(np.asarray(data.test_y[k, :m], np.int64))})
    return clients


def run_torch(method: str, clients: list[dict], init_state: dict, *, seed: int,
              hparams: dict, rounds: int, num_classes: int,
              running_var: str = "unbiased") -> dict:
    """``method`` in PyTorch from ``init_state`` for ``rounds`` rounds (full
    participation); ``torch.manual_seed(seed)`` drives the batch orders.

    Returns:
      ``{"accuracy", "client_mean_accuracy", "client_p10"}`` in percent, as fedjax-sim's
      summary computes them (every client on the model it uses).
    """
    import torch

    torch.manual_seed(seed)
    x0 = clients[0]["x"]
    side, fc_in = x0.shape[-1], init_state["fc1.weight"].shape[1]
    padding = 2 if fc_in == 64 * (side // 4) ** 2 else 0
    net = make_net(num_classes, channels=x0.shape[1], padding=padding, flat=fc_in,
                   running_var=running_var)
    net.load_state_dict(init_state, strict=False)
    personal = PERSONAL[method]
    keys = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    own_keys = [k for k in keys if k.split(".")[0] in personal]
    shared_keys = [k for k in keys if k not in own_keys]
    own = [{k: net.state_dict()[k].clone() for k in own_keys} for _ in clients]
    counts = np.array([len(c["y"]) for c in clients])
    sgd = {"epochs": hparams["local_epochs"], "batch_size": hparams["batch_size"],
           "lr": hparams["lr"], "momentum": hparams["momentum"],
           "weight_decay": hparams["weight_decay"]}
    for _ in range(rounds):
        uploads = []
        for k, client in enumerate(clients):
            model = copy.deepcopy(net)
            model.load_state_dict(own[k], strict=False)
            train_epochs(model, list(model.parameters()), client["x"], client["y"], **sgd)
            state = model.state_dict()
            own[k] = {key: state[key].detach().clone() for key in own_keys}
            uploads.append({key: state[key].detach().clone() for key in shared_keys})
        if shared_keys:
            net.load_state_dict(weighted_average(uploads, counts, shared_keys), strict=False)
    per_client, correct, total = [], 0, 0
    for k, client in enumerate(clients):
        model = copy.deepcopy(net)
        model.load_state_dict(own[k], strict=False)
        right = count_correct(model, client["test_x"], client["test_y"])
        per_client.append(right / len(client["test_y"]))
        correct += right
        total += len(client["test_y"])
    return {"accuracy": 100.0 * correct / total,
            "client_mean_accuracy": 100.0 * float(np.mean(per_client)),
            "client_p10": 100.0 * float(np.percentile(per_client, 10))}


# --------------------------------------------------------------------------------------


def compare(methods, seeds, alphas, *, rounds: int | None = None, side: str = "both",
            running_var: str = "unbiased", log=print) -> list[dict]:
    """Both sides (or one: ``side``) for every α, method and seed.

    Returns:
      Per (α, method) ``{"alpha", "method", "torch", "fedjax", "torch_s", "fedjax_s"}``:
      per seed the ``run_torch`` / ``run_fedjax`` dicts, each side's wall time in seconds.
    """
    rows = []
    for alpha in alphas:
        spec = default_spec(alpha)
        data, model = build(spec)
        rounds_ = spec.rounds if rounds is None else rounds
        clients = client_images(data) if side != "fedjax" else None
        for method in methods:
            hp = setting(spec)
            row = {"alpha": alpha, "method": method, "torch": [], "fedjax": [],
                   "torch_s": 0.0, "fedjax_s": 0.0}
            for seed in seeds:
                if side != "torch":
                    tic = time.perf_counter()
                    row["fedjax"].append(run_fedjax(method, data, model, seed=seed,
                                                    rounds=rounds_))
                    row["fedjax_s"] += time.perf_counter() - tic
                if side != "fedjax":
                    init = state_dict_of(initial_params(make_algorithm(method, model), data,
                                                        seed))
                    tic = time.perf_counter()
                    row["torch"].append(run_torch(method, clients, init, seed=seed,
                                                  hparams=hp, rounds=rounds_,
                                                  num_classes=data.num_classes,
                                                  running_var=running_var))
                    row["torch_s"] += time.perf_counter() - tic
            log(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _stats(values: list[dict], key: str = "accuracy") -> tuple[float, float] | None:
    if not values:
        return None
    a = np.asarray([v[key] for v in values])
    return float(a.mean()), float(a.std())


def markdown_table(rows: list[dict]) -> str:
    """Per (α, method): mean ± std (population std over seeds) of each side's accuracy
    and the difference of the means, fedjax-sim minus PyTorch, in points."""
    lines = ["| α | method | PyTorch % | fedjax-sim % | difference (points) |",
             "|---|---|---|---|---|"]
    for row in rows:
        a, b = _stats(row["torch"]), _stats(row["fedjax"])
        cells = [f"{s[0]:.2f} ± {s[1]:.2f}" if s else "—" for s in (a, b)]
        diff = f"{b[0] - a[0]:+.2f}" if a and b else "—"
        lines.append(f"| {row['alpha']:g} | {row['method']} | {cells[0]} | {cells[1]} "
                     f"| {diff} |")
    return "\n".join(lines)


def per_seed_lines(rows: list[dict]) -> str:
    """Every seed's accuracy, client mean and bottom decile (p10), both sides."""
    lines = []
    for row in rows:
        for label in ("torch", "fedjax"):
            if row[label]:
                cells = ", ".join(f"{v['accuracy']:.2f} (mean {v['client_mean_accuracy']:.1f},"
                                  f" p10 {v['client_p10']:.1f})" for v in row[label])
                lines.append(f"α {row['alpha']:g} {row['method']} {label}: {cells}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="fedavg,fedbn",
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--alphas", default=None,
                        help="comma-separated Dirichlet α (default: the run's default)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="communication rounds (default: the run's default)")
    parser.add_argument("--side", default="both", choices=SIDES)
    parser.add_argument("--running-var", default="unbiased", choices=RUNNING_VARS,
                        help="PyTorch side's running-variance update (see the docstring)")
    parser.add_argument("--json", default=None, help="also write the per-seed rows here")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)
    methods, seeds = methods_and_seeds(args, METHODS)
    alphas = (_parse_list(args.alphas, float, "--alphas") if args.alphas
              else [default_spec().alpha])
    if args.rounds is not None and args.rounds < 1:
        raise ValueError(f"--rounds must be an integer >= 1, got {args.rounds}")

    import torch

    torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    rows = compare(methods, seeds, alphas, rounds=args.rounds, side=args.side,
                   running_var=args.running_var)
    wall = time.perf_counter() - start
    info = setting(default_spec())
    rounds = info["rounds"] if args.rounds is None else args.rounds
    print(f"\n{info['dataset']}, {info['model']}, {info['num_clients']} clients, Dirichlet α "
          f"{','.join(f'{a:g}' for a in alphas)} (partition seed {info['partition_seed']}), "
          f"init {info['init']}, SGD lr {info['lr']}, batch {info['batch_size']}, "
          f"{info['local_epochs']} local epochs, {rounds} rounds, seeds "
          f"{','.join(map(str, seeds))}, PyTorch running var {args.running_var}; final-round "
          f"accuracy; {wall:.0f} s\n")
    print(markdown_table(rows))
    print()
    print(per_seed_lines(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"setting": {**info, "rounds": rounds, "alphas": alphas, "seeds": seeds,
                         "running_var": args.running_var}, "rows": rows, "wall_s": wall},
            indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
