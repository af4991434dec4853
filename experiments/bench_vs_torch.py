"""FedAvg round throughput: ``fedjax-sim bench`` against a PyTorch per-client loop.

The workload is the one of ``fedjax-sim bench``: K clients with 320 random 28x28x1 samples
each, ``local_steps`` SGD steps of batch ``batch_size`` per client and round, then the
sample-weighted average of the client models. The PyTorch side is written the way PFLlib
and FL-bench run clients: a deep copy of the global model per client, ``torch.optim.SGD``
over the client's batches, and a state-dict average at the server.

Both sides run in this one command, alternately, ``--repeats`` times; the best round of
each is kept (contention from other processes only ever slows a run down). fedjax-sim
runs as ``fedjax-sim bench`` does by default, with one XLA device per core on a CPU host
(the client axis sharded over them), and also with ``--cpu-devices 1`` (one device whose
operations use every core) for comparison. PyTorch is timed with one intra-op thread and
with its default count, and the faster is the reference. The matmul peak is the best
2048x2048 float32 matmul of XLA (one on one device, and one per device at once) and of
PyTorch.

    pip install -e ".[bench]"      # torch: a benchmark-only extra
    python experiments/bench_vs_torch.py --models mlp,cnn
    python experiments/bench_vs_torch.py --models mlp,cnn --torch-device cuda  # GPU host

Prints one JSON line per measurement and a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import numpy as np


def torch_models(name: str):
    from torch import nn

    if name == "mlp":  # FedAvg 2NN, as the JAX mlp
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200),
                             nn.ReLU(), nn.Linear(200, 10))
    if name == "cnn":  # FedAvg CNN / FL-bench avgcnn, VALID 5x5 convolutions, as the JAX cnn
        return nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
    raise ValueError(name)


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_rounds(model_name: str, *, num_clients: int, local_steps: int, batch_size: int,
                 samples: int, rounds: int, threads: int | None, seed: int = 0,
                 device: str = "cpu") -> float:
    """Best seconds per round of the PFLlib / FL-bench style per-client loop."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    x = torch.rand(num_clients, samples, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (num_clients, samples), device=device)
    global_model = torch_models(model_name).to(device)
    weights = torch.full((num_clients,), float(samples), device=device)
    weights = weights / weights.sum()

    def one_round():
        states = []
        for k in range(num_clients):
            client = copy.deepcopy(global_model)
            client.train()
            optimizer = torch.optim.SGD(client.parameters(), lr=0.01)
            for _ in range(local_steps):
                rows = torch.randint(0, samples, (batch_size,), device=device)
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(client(x[k, rows]), y[k, rows])
                loss.backward()
                optimizer.step()
            states.append(client.state_dict())
        average = {name: sum(w * s[name] for w, s in zip(weights, states, strict=True))
                   for name in states[0]}
        global_model.load_state_dict(average)

    one_round()  # warm-up
    _synchronize(device)
    best = np.inf
    for _ in range(rounds):
        tic = time.perf_counter()
        one_round()
        _synchronize(device)
        best = min(best, time.perf_counter() - tic)
    return best


def torch_peak(n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(n, n, device=device)
    a @ a
    _synchronize(device)
    best = np.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ a
        _synchronize(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def jax_bench(model: str, args, cpu_devices: str = "auto") -> dict:
    """``fedjax-sim bench`` in a fresh process (so that XLA's thread pool is its own)."""
    command = [sys.executable, "-m", "fedjax_sim.cli", "bench", "--model", model,
               "--num-clients", str(args.num_clients), "--local-steps", str(args.local_steps),
               "--batch-size", str(args.batch_size), "--rounds", str(args.rounds),
               "--rounds-per-call", str(args.rounds_per_call),
               "--client-strategy", args.client_strategy, "--cpu-devices", cpu_devices,
               "--peak"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--num-clients", type=int, default=50)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per repeat")
    parser.add_argument("--rounds-per-call", type=int, default=1)
    parser.add_argument("--client-strategy", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-device", default="cpu",
                        help="PyTorch device, e.g. 'cuda' on a GPU host (fedjax-sim uses JAX's "
                             "default backend)")
    args = parser.parse_args(argv)
    # Intra-op threads matter on CPU only.
    torch_threads = (1, None) if args.torch_device == "cpu" else (None,)
    steps = args.num_clients * args.local_steps
    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        jax_best, one_device_best, torch_best = [], [], {1: [], None: []}
        peaks, flops, devices = [], None, None
        for _ in range(args.repeats):
            for cpu_devices, best in (("auto", jax_best), ("1", one_device_best)):
                result = jax_bench(model, args, cpu_devices)
                print(json.dumps({"side": "jax", **result}), flush=True)
                best.append(result["round_s_best"])
                peaks.append(result["matmul_peak_gflops"])
                flops = result["flops_per_client_step"]
                if cpu_devices == "auto":
                    devices, strategy = result["devices"], result["strategy"]
            for threads in torch_threads:
                seconds = torch_rounds(model, num_clients=args.num_clients,
                                       local_steps=args.local_steps, batch_size=args.batch_size,
                                       samples=args.samples, rounds=args.rounds, threads=threads,
                                       device=args.torch_device)
                torch_best[threads].append(seconds)
                print(json.dumps({"side": "torch", "model": model, "device": args.torch_device,
                                  "threads": threads or "default",
                                  "round_s": seconds, "client_steps_per_s": steps / seconds}),
                      flush=True)
            peaks.append(torch_peak(device=args.torch_device))
        jax_rate = steps / min(jax_best)
        torch_rate = steps / min(min(v) for v in torch_best.values() if v)
        peak = max(peaks)
        rows.append({
            "model": model, "devices": devices, "jax_client_steps_per_s": jax_rate,
            "jax_one_device_client_steps_per_s": steps / min(one_device_best),
            "torch_client_steps_per_s": torch_rate, "speedup": jax_rate / torch_rate,
            "jax_gflops": jax_rate * flops / 1e9, "matmul_peak_gflops": peak,
            "peak_fraction": jax_rate * flops / 1e9 / peak, "strategy": strategy,
        })
        print(json.dumps({"summary": rows[-1]}), flush=True)
    print("\n| model | fedjax-sim client-steps/s (devices) | fedjax-sim, 1 device "
          "| PyTorch loop client-steps/s | speedup | fedjax-sim GFLOP/s | matmul peak GFLOP/s "
          "| of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['jax_client_steps_per_s']:,.0f} ({r['devices']}) "
              f"| {r['jax_one_device_client_steps_per_s']:,.0f} "
              f"| {r['torch_client_steps_per_s']:,.0f} | {r['speedup']:.2f}x "
              f"| {r['jax_gflops']:.0f} | {r['matmul_peak_gflops']:.0f} "
              f"| {100 * r['peak_fraction']:.0f}% |")


if __name__ == "__main__":
    main()
