"""FedAvg rounds of the next-token LSTMs, and of the CNN on CIFAR-shaped uint8 images with
augmentation: fedjax-sim against PyTorch on the same CPU.

The workload: K clients of random token sequences, ``local_steps`` SGD steps of batch
``batch_size`` per client and round, then the sample-weighted average of the client
models. Shakespeare: the character LSTM (embedding 8, two LSTMs of 256, 90 outputs),
sequences of 80, batch 4 (Reddi et al.'s setting); StackOverflow: the word LSTM
(embedding 96, LSTM 670, projection 96, 10,004 outputs), sequences of 20, batch 16.
CIFAR: the avgcnn (878,538 parameters) on 32x32x3 uint8 images scaled by 1/255, batch
32, every batch randomly cropped (padding 4) and flipped: inside the jitted step here
(``augment=crop_flip``), per sample as torchvision's transforms do on the PyTorch side.

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
    "cifar": dict(model="cnn", vocab=10, length=None, batch=32),
}


def crop_flip(images):
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, sample by sample."""
    import torch

    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    out = torch.empty_like(images)
    offsets = torch.randint(0, 9, (images.shape[0], 2))
    flips = torch.rand(images.shape[0]) < 0.5
    for i in range(images.shape[0]):
        top, left = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, top:top + 32, left:left + 32]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


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

    if task == "cifar":  # FL-bench's avgcnn, as the JAX cnn (VALID 5x5 convolutions)
        return nn.Sequential(
            nn.Conv2d(3, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 512), nn.ReLU(), nn.Linear(512, 10))
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
            if x.dtype == torch.uint8:  # images, (B, C, H, W): scale, then augment
                x = crop_flip(x.float() / 255.0)
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

    def round_(xs, ys):  # (K, steps, B, L) tokens or (K, steps, B, C, H, W) images
        params = {k: v.detach().unsqueeze(0).expand(xs.shape[0], *v.shape).clone()
                  for k, v in global_model.named_parameters()}
        for s in range(xs.shape[1]):
            x = xs[:, s]
            if x.dtype == torch.uint8:
                x = torch.stack([crop_flip(client.float() / 255.0) for client in x])
            params = step(params, x, ys[:, s])
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
    parser.add_argument("--tasks", default="shakespeare,stackoverflow,cifar")
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
        if task == "cifar":
            xs = rng.integers(0, 256, (k, steps * batch, 32, 32, 3), dtype=np.uint8)
            ys = rng.integers(0, 10, (k, steps * batch))
            shape, options = (32, 32, 3), {"augment": "crop_flip"}
        else:
            tokens = rng.integers(1, spec["vocab"], (k, steps * batch, length + 1))
            xs, ys = tokens[..., :-1], tokens[..., 1:]
            shape, options = (length,), {}
        data = ragged_from_clients([(x, y) for x, y in zip(xs, ys, strict=True)],
                                   [(x[:2], y[:2]) for x, y in zip(xs, ys, strict=True)],
                                   num_classes=spec["vocab"], name=task)
        model = make_model(spec["model"], shape, spec["vocab"])
        algorithm = algorithms.make("fedavg", model, local_steps=steps, batch_size=batch,
                                    lr=args.lr, **options)
        state = jax.jit(algorithm.init)(jax.random.key(0), data)
        step = jax.jit(algorithm.round)
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        if task == "cifar":  # PyTorch's channels-first layout
            txs = torch.as_tensor(xs).permute(0, 1, 4, 2, 3).reshape(k, steps, batch, 3, 32, 32)
            tys = torch.as_tensor(ys).reshape(k, steps, batch)
        else:
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
