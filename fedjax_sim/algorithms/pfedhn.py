"""pFedHN: a server hypernetwork generates each client's model from the client's embedding.

Shamsian, Navon, Fetaya, Chechik. "Personalized Federated Learning using Hypernetworks."
ICML 2021.

The server holds a hypernetwork h(·; φ) and one embedding v_k per client; client k's model
is θ_k = h(v_k; φ) (Sec. 3, Eq. 1). A round, for every sampled client at once:

1. the server generates θ_k = h(v_k; φ) and sends it;
2. the client runs its local SGD from θ_k (the run's optimizer, epochs or steps, batch
   size) to θ̃_k and returns Δθ_k = θ_k − θ̃_k;
3. the server updates the hypernetwork and the client's embedding by the chain rule
   through θ_k (Alg. 1, Eq. 3–4):

       ∇φ = (∂θ_k/∂φ)ᵀ Δθ_k,   ∇v_k = (∂θ_k/∂v_k)ᵀ Δθ_k,
       φ ← φ − α ∇φ,           v_k ← v_k − α ∇v_k.

   Both are one vector-Jacobian product of h per client, batched over the cohort.

A client is evaluated on its generated model h(v_k; φ) (no personal fine-tuning: the
paper's pFedHN, not pFedHN-PC).

The hypernetwork (Sec. 3.1): v_k ∈ R^d (``hn_embed_dim``, default 1 + K / 4 as the
paper's code chooses) → ``hn_layers`` fully connected ReLU layers of ``hn_hidden`` units
→ one linear head that outputs every parameter of the target model (the heads of the
paper's code, one per tensor, are one linear map of the last hidden layer to the
concatenated parameters; the same function).

Choices made here (the paper runs one client per step; with a cohort of M):
* the cohort's ∇φ are combined by their sample-weighted mean (FedAvg's weights) into one
  step of size α = ``hn_lr`` (plain SGD; the paper's code adds momentum 0.9 and weight
  decay 1e-3 to it);
* the head's bias starts at the target model's own initialization and its weights at
  N(0, (0.01)² / hn_hidden), so that every client's first generated model is close to a
  standard initialization (the paper's code uses PyTorch's default ``nn.Linear``
  initialization for the heads);
* the embeddings live on the server (the client-state rows hold them, as the simulator
  keeps every per-client quantity on the client axis); they never leave it.

Communication per sampled client and round: θ_k down, Δθ_k up (|θ| floats each way).
``hn_lr`` is traced: a sweep over it is one program, each value giving its own run's
floats to float32 rounding (about 1 ulp: compiled in or traced, XLA fuses the
hypernetwork's products differently), not bit for bit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    Algorithm,
    HParam,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState
from fedjax_sim.models.base import Model

HPARAMS = (
    HParam("hn_lr", 0.01, float, lambda v: v > 0, "> 0",
           "pFedHN: step size α of the hypernetwork and of the client embeddings",
           traced=True, tune_values=(0.01, 0.1, 0.5)),
    HParam("hn_embed_dim", None, int, lambda v: v is None or v >= 1,
           "a positive integer or unset",
           "pFedHN: client embedding size d (default 1 + num_clients / 4)"),
    HParam("hn_hidden", 100, int, lambda v: v >= 1, "a positive integer",
           "pFedHN: units of each hidden layer of the hypernetwork"),
    HParam("hn_layers", 1, int, lambda v: v >= 1, "a positive integer",
           "pFedHN: hidden layers of the hypernetwork"),
)


def embed_dim(hp: dict, num_clients: int) -> int:
    """The embedding size: ``hn_embed_dim``, or 1 + K / 4 (the paper's code)."""
    given = hp.get("hn_embed_dim")
    return int(given) if given is not None else 1 + num_clients // 4


def hypernetwork(model: Model, hp: dict):
    """``(init, generate)`` of the hypernetwork for ``model``:
    ``init(key, d) -> φ`` and ``generate(φ, v) -> θ`` (a parameter tree of ``model``)."""
    template, unravel = ravel_pytree(model.init(jax.random.PRNGKey(0)))
    hidden, layers = int(hp["hn_hidden"]), int(hp["hn_layers"])

    def init(key, dim, target_init):
        keys = jax.random.split(key, layers + 1)
        body = []
        width = dim
        for i in range(layers):
            bound = 1.0 / math.sqrt(width)
            body.append({"w": jax.random.uniform(keys[i], (width, hidden), jnp.float32,
                                                 -bound, bound),
                         "b": jnp.zeros((hidden,), jnp.float32)})
            width = hidden
        head = {"w": (0.01 / math.sqrt(hidden)) * jax.random.normal(
                    keys[-1], (hidden, template.size), jnp.float32),
                "b": ravel_pytree(target_init)[0].astype(jnp.float32)}
        return {"body": body, "head": head}

    def generate(phi, v):
        h = v
        for layer in phi["body"]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return unravel(h @ phi["head"]["w"] + phi["head"]["b"])

    return init, generate


def pfedhn(model: Model, *, cover=(), **hp) -> Algorithm:
    """pFedHN bound to ``model``; ``hp`` holds the common hyperparameters and those of
    :data:`HPARAMS`."""
    init_hn, generate = hypernetwork(model, hp)

    def init_with(key, data, traced):
        del traced
        state_key, hn_key, emb_key, model_key = jax.random.split(key, 4)
        dim = embed_dim(hp, data.num_clients)
        phi = init_hn(hn_key, dim, model.init(model_key))
        # The paper's code: embeddings N(0, 1).
        embeddings = jax.random.normal(emb_key, (data.num_clients, dim), jnp.float32)
        return SimState.create(state_key, {"params": phi}, {"embedding": embeddings},
                               data.num_clients)

    def client_update(traced, phi, own, x, y, n, key):
        h = {**hp, **traced}
        theta, pullback = jax.vjp(generate, phi, own["embedding"])
        trained, loss = local_sgd(model, h)(theta, x, y, n, key)
        delta = jax.tree.map(lambda a, b: a - b, theta, trained)
        grad_phi, grad_v = pullback(delta)
        embedding = own["embedding"] - h["hn_lr"] * grad_v
        return grad_phi, {"embedding": embedding}, loss

    def server_update(traced, state, cohort, context):
        del context
        phi = state.server["params"]
        # cohort.uploads: the cohort's sample-weighted mean of ∇φ.
        return {"params": jax.tree.map(lambda p, g: p - traced["hn_lr"] * g, phi,
                                       cohort.uploads)}, {}

    def logits(own, phi, x):
        return model.apply(generate(phi, own["embedding"]), x)

    size = num_params_bytes(model)
    method = Method(client_update, logits, server_update=server_update)
    return federated_algorithm("pfedhn", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)


register("pfedhn", pfedhn, HPARAMS)
