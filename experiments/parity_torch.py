"""FedAvg and FedPer rounds of fedjax-sim against a plain PyTorch per-client loop.

Both sides start from the same weights (fedjax-sim's initialization, copied into equivalent
``torch.nn`` modules) and take the same steps: the sample orders of every round, client
and epoch are drawn once on the host (``core.local.sample_batch_orders``) and handed to
fedjax-sim as ``batch_order`` and to the PyTorch loop as its batch order. The PyTorch side
is written the way PFLlib and FL-bench run clients: a deep copy of the global model per
client, ``torch.optim.SGD`` (momentum and weight decay as given) over the client's
batches, the last one partial, and a sample-weighted state-dict average at the server
(FedPer: of everything but the head, which every client keeps for itself).

After every round it prints the largest absolute difference between the two sides'
parameters (FedPer: the averaged base and every client's head), and the largest absolute
parameter, for scale.

    pip install -e ".[bench]"      # torch: a benchmark-only extra
    python experiments/parity_torch.py
    python experiments/parity_torch.py --models cnn --algorithms fedper --rounds 5

Prints one JSON line per run and a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import algorithms
from fedjax_sim.core.local import check_batch_orders, sample_batch_orders
from fedjax_sim.data import make_federated_data
from fedjax_sim.models import make_model

# Top-level layers of fedjax-sim's models, in order; ``head`` is the classifier.
LAYERS = {"mlp": ("fc1", "fc2", "head"), "cnn": ("conv1", "conv2", "fc1", "head")}


def torch_model(name: str, params: dict, input_shape: tuple[int, ...]):
    """The PyTorch twin of fedjax-sim's ``name`` holding ``params`` (fedjax-sim layout).

    Layer names match fedjax-sim's (``fc1``, ..., ``head``). Dense kernels (in, out) become
    ``weight`` (out, in); convolution kernels HWIO become OIHW; the cnn's first dense layer
    reads an NCHW flatten in PyTorch but an NHWC one in fedjax-sim, so its input columns
    are permuted from (h, w, c) to (c, h, w).
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            p = params
            if name == "mlp":
                self.fc1 = nn.Linear(*np.shape(p["fc1"]["kernel"]))
                self.fc2 = nn.Linear(*np.shape(p["fc2"]["kernel"]))
            else:
                kh, kw, cin, cout = np.shape(p["conv1"]["kernel"])
                # SAME padding of a 5x5 kernel pads 2 on every side, as padding=2 does.
                self.conv1 = nn.Conv2d(cin, cout, (kh, kw), padding=_same(kh, kw, input_shape))
                kh, kw, cin, cout = np.shape(p["conv2"]["kernel"])
                self.conv2 = nn.Conv2d(cin, cout, (kh, kw), padding=_same(kh, kw, input_shape))
                self.fc1 = nn.Linear(*np.shape(p["fc1"]["kernel"]))
            self.head = nn.Linear(*np.shape(p["head"]["kernel"]))

        def forward(self, x):  # x: (B, H, W, C) as in fedjax-sim
            if name == "mlp":
                x = x.reshape(x.shape[0], -1)
                x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
                return self.head(x)
            x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
            for conv in (self.conv1, self.conv2):
                x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
            x = torch.relu(self.fc1(x.flatten(1)))
            return self.head(x)

    net = Net()
    net.load_state_dict(to_torch_state(name, params, input_shape, net))
    return net


def _same(kh: int, kw: int, input_shape) -> tuple[int, int] | int:
    """PyTorch padding equal to the cnn's padding (SAME on small inputs, else VALID)."""
    h, w, _ = input_shape
    fits = all(((n - 4) // 2 - 4) // 2 >= 1 for n in (h, w))  # cnn's padding="auto"
    if fits:
        return 0
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError("SAME padding of an even kernel is asymmetric; not supported here")
    return (kh - 1) // 2, (kw - 1) // 2


def _fc1_columns(name: str, net, kernel: np.ndarray) -> np.ndarray:
    """fedjax-sim's fc1 kernel (H*W*C, out) of the cnn as PyTorch's (out, C*H*W)."""
    if name != "cnn":
        return kernel.T
    channels = net.conv2.out_channels
    side = round((kernel.shape[0] // channels) ** 0.5)
    h = w = side
    if h * w * channels != kernel.shape[0]:
        raise ValueError(f"cnn fc1 kernel of {kernel.shape[0]} rows is not square features")
    return kernel.reshape(h, w, channels, -1).transpose(3, 2, 0, 1).reshape(-1, h * w * channels)


def to_torch_state(name: str, params: dict, input_shape, net) -> dict:
    """fedjax-sim parameters as a PyTorch state dict of ``net`` (see ``torch_model``)."""
    import torch

    state = {}
    for layer in LAYERS[name]:
        kernel = np.asarray(params[layer]["kernel"])
        if kernel.ndim == 4:
            weight = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif layer == "fc1":
            weight = _fc1_columns(name, net, kernel)
        else:
            weight = kernel.T
        state[f"{layer}.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
        state[f"{layer}.bias"] = torch.from_numpy(np.array(params[layer]["bias"]))
    return state


def torch_round(global_model, heads, x, y, counts, orders, *, batch_size, lr, momentum,
                weight_decay, personal_head):
    """One round of the PyTorch per-client loop, in place.

    Args:
      global_model: the server's model (FedPer: its head is never used).
      heads: FedPer only, each client's head state (``head.weight``, ``head.bias``);
        replaced by the trained ones.
      x, y, counts: the clients' padded data and real counts (tensors / NumPy).
      orders: (K, E, N_max) this round's sample orders.
      personal_head: FedPer (True) or FedAvg (False).
    """
    import torch

    states = []
    for k in range(len(counts)):
        client = copy.deepcopy(global_model)
        if personal_head:
            client.load_state_dict(heads[k], strict=False)
        client.train()
        optimizer = torch.optim.SGD(client.parameters(), lr=lr, momentum=momentum,
                                    weight_decay=weight_decay)
        n = int(counts[k])
        for epoch_order in orders[k]:
            order = torch.from_numpy(np.asarray(epoch_order[:n], np.int64))
            for start in range(0, n, batch_size):
                rows = order[start : start + batch_size]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(client(x[k][rows]), y[k][rows])
                loss.backward()
                optimizer.step()
        state = {key: value.detach().clone() for key, value in client.state_dict().items()}
        if personal_head:
            heads[k] = {key: value for key, value in state.items() if key.startswith("head.")}
        states.append(state)
    dtype = next(global_model.parameters()).dtype
    weights = torch.tensor(np.asarray(counts, np.float64) / np.sum(counts), dtype=dtype)
    shared = [key for key in states[0] if not (personal_head and key.startswith("head."))]
    average = {key: sum(w * s[key] for w, s in zip(weights, states, strict=True))
               for key in shared}
    global_model.load_state_dict(average, strict=False)


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[key].double().numpy() - b[key].double().numpy())))
               for key in a)


def _max_abs(state: dict) -> float:
    return max(float(np.max(np.abs(value.numpy()))) for value in state.values())


def run_parity(
    model_name: str,
    algorithm: str,
    data,
    *,
    rounds: int = 3,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    conv_impl: str = "auto",
    client_strategy: str = "auto",
    reference: bool = True,
    float64: bool = False,
) -> list[dict]:
    """Runs ``rounds`` rounds of ``algorithm`` on both sides and compares after each.

    Args:
      model_name: ``mlp`` or ``cnn``.
      algorithm: ``fedavg`` or ``fedper``.
      data: ``FederatedData`` (NumPy arrays).
      rounds, epochs, batch_size, lr, momentum, weight_decay: the run (full participation).
      seed: seed of the initial weights and of the batch orders.
      conv_impl, client_strategy: fedjax-sim's options.
      reference: also run the PyTorch loop in float64 and report how far the float32 loop
        is from it: the spread that float32 rounding alone causes, against which
        ``max_abs_diff`` is judged.
      float64: run both sides in float64 (needs ``jax_enable_x64``). In float32 a rounding
        difference occasionally pushes a ReLU unit (or a max-pool choice) the other way on
        one side only, and that unit's weights then differ by 1e-5 or more; in float64 the
        sides start 1e-8 apart (fedjax-sim's aggregation weights stay float32), which makes
        such events rarer, while a semantic difference shows in every setting from the
        first round.

    Returns:
      Per round, ``{"round", "max_abs_diff", "max_abs_param"}`` (and with ``reference``
      ``"torch_float32_vs_float64"``), maxima over every parameter (FedPer: the averaged
      base and every client's head).
    """
    import torch

    if algorithm not in ("fedavg", "fedper"):
        raise ValueError(f"algorithm must be fedavg or fedper, got {algorithm!r}")
    if float64 and not jax.config.jax_enable_x64:
        raise ValueError("float64=True needs jax_enable_x64 (JAX_ENABLE_X64=1)")
    counts = np.asarray(data.train_counts)
    n_max = int(np.shape(data.train_x)[1])
    orders = check_batch_orders(
        sample_batch_orders(seed, counts, rounds=rounds, epochs=epochs, n_max=n_max), counts,
        epochs=epochs)
    model = make_model(model_name, data.input_shape, data.num_classes, conv_impl=conv_impl)
    alg = algorithms.make(
        algorithm, model, batch_order=orders, local_epochs=epochs, batch_size=batch_size,
        lr=lr, momentum=momentum, weight_decay=weight_decay, client_strategy=client_strategy)
    state = alg.init(jax.random.key(seed), data)
    if float64:
        def wide(a):
            return a.astype(np.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a

        data = data.replace(train_x=np.asarray(data.train_x, np.float64))
        state = state.replace(server=jax.tree.map(wide, state.server),
                              clients=jax.tree.map(wide, state.clients))
    round_fn = jax.jit(alg.round)

    input_shape = tuple(data.input_shape)
    global_params = jax.device_get(state.server["params"])
    personal = algorithm == "fedper"
    sides = {}  # the PyTorch loop in float32 and, as the reference, in float64
    dtypes = (torch.float32, torch.float64) if reference else (torch.float32,)
    if float64:
        dtypes = (torch.float64,)
    for dtype in dtypes:
        net = torch_model(model_name, global_params, input_shape).to(dtype)
        head = {k: v for k, v in net.state_dict().items() if k.startswith("head.")}
        sides[dtype] = (net, [copy.deepcopy(head) for _ in counts] if personal else None,
                        torch.from_numpy(np.array(data.train_x)).to(dtype))
    y = torch.from_numpy(np.asarray(data.train_y, np.int64))

    def flat(net, heads) -> dict:
        """Every compared parameter: the server's (FedPer: without the head), then each
        client's head."""
        out = {k: v for k, v in net.state_dict().items()
               if not (personal and k.startswith("head."))}
        for k, own in enumerate(heads or ()):
            out.update({f"client{k}.{key}": v for key, v in own.items()})
        return out

    results = []
    for r in range(rounds):
        state, _ = round_fn(state, data)
        for net, heads, x in sides.values():
            torch_round(net, heads, x, y, counts, orders[r], batch_size=batch_size, lr=lr,
                        momentum=momentum, weight_decay=weight_decay, personal_head=personal)
        server = jax.device_get(state.server["params"])
        main = dtypes[0]
        ours = to_torch_state(model_name, server, input_shape, sides[main][0])
        ours = {k: v for k, v in ours.items() if not (personal and k.startswith("head."))}
        if personal:
            own = jax.device_get(state.clients["personal"])
            for k in range(len(counts)):
                client = {**server, **jax.tree.map(lambda a, k=k: a[k], own)}
                ours.update({f"client{k}.{key}": v for key, v in to_torch_state(
                    model_name, client, input_shape, sides[main][0]).items()
                    if key.startswith("head.")})
        theirs = flat(*sides[main][:2])
        row = {"round": r + 1, "max_abs_diff": _max_diff(ours, theirs),
               "max_abs_param": _max_abs(theirs)}
        if reference and not float64:
            # How far float32 rounding alone moves the PyTorch loop itself.
            row["torch_float32_vs_float64"] = _max_diff(theirs, flat(*sides[torch.float64][:2]))
        results.append(row)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--algorithms", default="fedavg,fedper")
    parser.add_argument("--num-clients", type=int, default=6)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--optimizers", default="0,0;0.9,1e-4",
                        help="';'-separated momentum,weight_decay pairs")
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--client-strategy", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64", action="store_true",
                        help="both sides in float64 (rounding rarely decides a ReLU or max-pool)")
    args = parser.parse_args(argv)
    if args.float64:
        jax.config.update("jax_enable_x64", True)
    data, _, _ = make_federated_data("digits", num_clients=args.num_clients, alpha=args.alpha,
                                     seed=args.seed)
    optimizers = [tuple(float(v) for v in pair.split(",")) for pair in args.optimizers.split(";")]
    rows = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for algorithm in [a.strip() for a in args.algorithms.split(",") if a.strip()]:
            for momentum, weight_decay in optimizers:
                result = run_parity(
                    model_name, algorithm, data, rounds=args.rounds, epochs=args.local_epochs,
                    batch_size=args.batch_size, lr=args.lr, momentum=momentum,
                    weight_decay=weight_decay, seed=args.seed, conv_impl=args.conv_impl,
                    client_strategy=args.client_strategy, float64=args.float64)
                row = {"model": model_name, "algorithm": algorithm, "momentum": momentum,
                       "weight_decay": weight_decay, "rounds": result}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\nclient train counts: {np.asarray(data.train_counts).tolist()}, batch "
          f"{args.batch_size}, {args.local_epochs} local epochs, lr {args.lr}, "
          f"{'float64' if args.float64 else 'float32'}\n")
    print("| model | algorithm | momentum | weight decay | "
          + " | ".join(f"round {r + 1} max abs diff" for r in range(args.rounds))
          + ("" if args.float64 else " | PyTorch float32 vs float64, last round")
          + " | max abs param |")
    print("|---|---|---|---|" + "---|" * (args.rounds + 1 + (not args.float64)))
    for row in rows:
        print(f"| {row['model']} | {row['algorithm']} | {row['momentum']:g} "
              f"| {row['weight_decay']:g} | "
              + " | ".join(f"{r['max_abs_diff']:.2e}" for r in row["rounds"])
              + ("" if args.float64 else
                 f" | {row['rounds'][-1]['torch_float32_vs_float64']:.2e}")
              + f" | {row['rounds'][-1]['max_abs_param']:.2f} |")


if __name__ == "__main__":
    main()
