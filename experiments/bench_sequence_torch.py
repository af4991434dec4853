"""FedAvg rounds of the next-token LSTMs: fedjax-sim against PyTorch on the same CPU.

The workload: K clients of random token sequences, ``local_steps`` SGD steps of batch
``batch_size`` per client and round, then the sample-weighted average of the client
models. Shakespeare: the character LSTM (embedding 8, two LSTMs of 256, 90 outputs),
sequences of 80, batch 4 (Reddi et al.'s setting); StackOverflow: the word LSTM
(embedding 96, LSTM 670, projection 96, 10,004 outputs), sequences of 20, batch 16.

PyTorch runs the way PFLlib and FL-bench run clients (a deep copy of the global model per
client, ``torch.optim.SGD`` over its batches, a state-dict average), and as every client
batched with ``torch.func.vmap`` over ``functional_call`` (with and without
``torch.compile``) where PyTorch supports it. fedjax-sim runs its jitted round
(``client_strategy=auto``) on one CPU device. Both sides alternate ``--repeats`` times in
this process; the best round of each is kept. Client-steps/s = K x local_steps / round.

    pip install -e ".[bench]"
    python experiments/bench_sequence_torch.py
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np

TASKS = {
    "shakespeare": dict(model="char_lstm", vocab=90, length=80, batch=4),
    "stackoverflow": dict(model="so_lstm", vocab=10_004, length=20, batch=16),
}


def torch_model(task: str):
    from torch import nn

    class CharLSTM(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.embedding = nn.Embedding(vocab, 8)
            self.lstm = nn.LSTM(8, 256, num_layers=2, batch_first=True)
            self.head = nn.Linear(256, vocab)

        def forward(self, x):
            return self.head(self.lstm(self.embedding(x))[0])

    class WordLSTM(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.embedding = nn.Embedding(vocab, 96)
            self.lstm = nn.LSTM(96, 670, batch_first=True)
            self.projection = nn.Linear(670, 96)
            self.head = nn.Linear(96, vocab)

        def forward(self, x):
            return self.head(self.projection(self.lstm(self.embedding(x))[0]))

    vocab = TASKS[task]["vocab"]
    return CharLSTM(vocab) if task == "shakespeare" else WordLSTM(vocab)


def torch_loop_round(global_model, batches, lr):
    """One FedAvg round, a client at a time (PFLlib / FL-bench style)."""
    import torch

    states = []
    for xs, ys in batches:  # per client: (steps, B, L) inputs and labels
        model = copy.deepcopy(global_model)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for x, y in zip(xs, ys, strict=True):
            opt.zero_grad()
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     y.reshape(-1))
            loss.backward()
            opt.step()
        states.append(model.state_dict())
    with torch.no_grad():
        averaged = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    global_model.load_state_dict(averaged)


def torch_vmap_round_fn(global_model, lr, compiled: bool):
    """One FedAvg round with every client batched by torch.func.vmap."""
    import torch
    from torch.func import functional_call, grad, vmap

    def loss_fn(params, x, y):
        logits = functional_call(global_model, params, (x,))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))

    def step(params, x, y):
        grads = grad(loss_fn)(params, x, y)
        return {k: params[k] - lr * grads[k] for k in params}

    step = vmap(step)
    if compiled:
        step = torch.compile(step)

    def round_(xs, ys):  # (K, steps, B, L)
        params = {k: v.detach().unsqueeze(0).expand(xs.shape[0], *v.shape).clone()
                  for k, v in global_model.named_parameters()}
        for s in range(xs.shape[1]):
            params = step(params, xs[:, s], ys[:, s])
        with torch.no_grad():
            for k, v in global_model.named_parameters():
                v.copy_(params[k].mean(0))

    return round_


def main(argv=None) -> None:
    import jax
    import torch

    from fedjax_sim import algorithms
    from fedjax_sim.data.federated import ragged_from_clients
    from fedjax_sim.models import make_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="shakespeare,stackoverflow")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for task in args.tasks.split(","):
        spec = TASKS[task]
        k, steps, batch, length = args.num_clients, args.local_steps, spec["batch"], \
            spec["length"]
        rng = np.random.default_rng(0)
        tokens = rng.integers(1, spec["vocab"], (k, steps * batch, length + 1))
        xs, ys = tokens[..., :-1], tokens[..., 1:]
        data = ragged_from_clients([(x, y) for x, y in zip(xs, ys, strict=True)],
                                   [(x[:2], y[:2]) for x, y in zip(xs, ys, strict=True)],
                                   num_classes=spec["vocab"], name=task)
        model = make_model(spec["model"], (length,), spec["vocab"])
        algorithm = algorithms.make("fedavg", model, local_steps=steps, batch_size=batch,
                                    lr=args.lr)
        state = jax.jit(algorithm.init)(jax.random.key(0), data)
        step = jax.jit(algorithm.round)
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        txs = torch.as_tensor(xs).reshape(k, steps, batch, length)
        tys = torch.as_tensor(ys).reshape(k, steps, batch, length)
        net = torch_model(task)
        sides = {"fedjax_sim": None, "torch_loop": None, "torch_vmap": None,
                 "torch_vmap_compile": None}
        runners = {}
        for name in ("torch_vmap", "torch_vmap_compile"):
            try:
                fn = torch_vmap_round_fn(net, args.lr, compiled=name.endswith("compile"))
                fn(txs, tys)  # warm-up (and compile)
                runners[name] = fn
            except Exception as err:  # PyTorch has no vmap rule for its fused LSTM
                sides[name] = f"unsupported: {type(err).__name__}: {str(err)[:120]}"
        for _ in range(args.repeats):
            tic = time.perf_counter()
            state, metrics = step(state, data)
            jax.block_until_ready(metrics)
            best = time.perf_counter() - tic
            sides["fedjax_sim"] = min(best, sides["fedjax_sim"] or best)
            tic = time.perf_counter()
            torch_loop_round(net, [(txs[c], tys[c]) for c in range(k)], args.lr)
            best = time.perf_counter() - tic
            sides["torch_loop"] = min(best, sides["torch_loop"] or best)
            for name, fn in runners.items():
                tic = time.perf_counter()
                fn(txs, tys)
                best = time.perf_counter() - tic
                sides[name] = min(best, sides[name] or best)
        row = {"task": task, "clients": k, "local_steps": steps, "batch": batch,
               "torch_threads": torch.get_num_threads()}
        for name, value in sides.items():
            row[name] = value if isinstance(value, str) else {
                "round_s": value, "client_steps_per_s": k * steps / value}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| task | fedjax-sim | PyTorch loop | torch.func vmap | vmap + compile | vs loop |"
          "\n|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda v: v.split(":")[0] if isinstance(v, str) else \
            f"{v['client_steps_per_s']:.0f}"
        ratio = r["fedjax_sim"]["client_steps_per_s"] / r["torch_loop"]["client_steps_per_s"]
        print(f"| {r['task']} | {cell(r['fedjax_sim'])} | {cell(r['torch_loop'])} "
              f"| {cell(r['torch_vmap'])} | {cell(r['torch_vmap_compile'])} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
