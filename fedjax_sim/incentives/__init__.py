"""Incentives for data sharing: free riding under the naive scheme, and accuracy shaping.

Karimireddy, Guo, Jordan. "Mechanisms that Incentivize Data Sharing in Federated
Learning." arXiv:2207.04557, 2022. This package simulates the paper's game on an accuracy
curve measured with the simulator; the notation follows the paper's ideas (its model of
rational data contributors, the free-riding analysis of the naive scheme, and the
accuracy-shaping mechanism built with contract-theory ideas), not its equation numbers.

The model
---------
N agents. Agent i has n_i samples available, contributes m_i in [0, n_i], pays c_i >= 0
per contributed sample and receives a model of accuracy a_i; its utility is
``u_i = a_i − c_i m_i``. ``v(m)``, the accuracy of a model trained on m samples in total,
is increasing and concave-ish. Alone, agent i contributes (to itself)
``m_i^solo = argmax_{m <= n_i} v(m) − c_i m`` and gets ``u_i^solo`` (``solo``).

Naive scheme: free riding
-------------------------
Everyone receives the global model trained on all contributions: ``a_i = v(Σ_j m_j)``.
Agent i's best response to the others' total M_−i is
``argmax_{m in [0, n_i]} v(m + M_−i) − c_i m``. On a concave v the equilibrium total is
unique and has ``v'(M) = min_i c_i`` wherever v is differentiable and the cheapest agent
is not capped by its n_i: only the lowest-cost agents contribute, the total is about the
lowest-cost agent's solo amount, and everybody else free-rides on it. A measured v need
not be concave, and then several totals can be equilibria (agents stop at one kink of v,
or several give all their data past a steep stretch that follows a flat one):
``naive_equilibrium`` returns the one reached by best responses from zero and lists every
equilibrium total (``naive_equilibria``), the lowest and the highest bounding what free
riding leaves.

Accuracy shaping: the mechanism
-------------------------------
Targets ``m_i^†`` are the largest contributions that still leave every agent as well off as
alone (individual rationality binding): ``m_i^† = max{m <= n_i : v(M^†) − c_i m >=
u_i^solo}`` with ``M^† = Σ_j m_j^†``, the largest fixed point of the non-decreasing map
``M -> Σ_i min(n_i, (v(M) − u_i^solo)_+ / c_i)`` (a curve with a plateau can have
smaller ones, at which every agent gives less), solved exactly on the piecewise-linear v.
Agent i receives

    γ_i(m_i; m_−i) = max(v(m_i), v(M) − (1 + δ) c_i (m_i^† − m_i)_+),   M = m_i + Σ_{j≠i} m_j,

never worse than alone, and for every sample short of its target it loses (1 + δ) c_i of
accuracy, more than the c_i it saves (δ > 0, ``DEFAULT_DELTA``); withholding everything
down to its solo amount leaves it exactly as well off as at the target (the tie goes to
the target). Contributing more than the target adds v' of accuracy per sample at a cost
c_i, which does not pay where v' <= c_i: on a concave v this holds at M^†, which is at
least the naive total where v' = min_j c_j. So ``m_i^†`` is each agent's best response
against the others at their targets; a measured curve need not be concave, and
``shaping_mechanism`` checks the best response of every agent (exactly, over every
breakpoint of its piecewise-linear utility, and on a grid) and reports the largest gain
from deviating. At the targets every agent gets v(M^†), from a total M^† at least the solo
sum: the surplus that free riding wasted goes into data, and each agent's utility is its
solo utility (individual rationality binds; an agent capped at n_i may keep more).

In the simulator
----------------
``value_curve`` measures v on a data set: level f keeps ``⌈f n_k⌉`` training rows of every
client, all levels run as one batched program, and v is the global model's test accuracy
(``v(0) = 1 / C``), linear between levels and made non-decreasing by a running maximum.
``deliver`` realizes a target accuracy γ_i by answering with a uniformly random class with
probability ``p_i = (a_i − γ_i) / (a_i − 1/C)`` (``a_i``: the global model's accuracy on agent
i's training data) and measures the delivered model on agent i's test set. Rows the model
trained on overstate its accuracy: ``hold_out`` keeps rows out of the game and of training
to calibrate on instead (``deliver(..., calibration=...)``), and ``Mechanism.anchored``
reads the pooled term v(M) off the model actually trained at the targets.
"""

from fedjax_sim.incentives.costs import (
    COST_DISTRIBUTIONS,
    check_costs,
    draw_costs,
    parse_cost_spec,
)
from fedjax_sim.incentives.game import (
    DEFAULT_DELTA,
    Equilibrium,
    Mechanism,
    Solo,
    ValueCurve,
    best_response,
    check_delta,
    curve_from_points,
    naive_equilibria,
    naive_equilibrium,
    shaped_accuracy,
    shaping_mechanism,
    solo,
)
from fedjax_sim.incentives.simulate import (
    DEFAULT_LEVELS,
    Delivery,
    Trained,
    check_levels,
    contribution_counts,
    deliver,
    hold_out,
    level_counts,
    level_splits,
    model_accuracies,
    shuffle_rows,
    train_on_contributions,
    value_curve,
    with_train_counts,
)

__all__ = [
    "COST_DISTRIBUTIONS",
    "DEFAULT_DELTA",
    "DEFAULT_LEVELS",
    "Delivery",
    "Equilibrium",
    "Mechanism",
    "Solo",
    "Trained",
    "ValueCurve",
    "best_response",
    "check_costs",
    "check_delta",
    "check_levels",
    "contribution_counts",
    "curve_from_points",
    "deliver",
    "draw_costs",
    "hold_out",
    "level_counts",
    "level_splits",
    "model_accuracies",
    "naive_equilibria",
    "naive_equilibrium",
    "parse_cost_spec",
    "shaped_accuracy",
    "shaping_mechanism",
    "shuffle_rows",
    "solo",
    "train_on_contributions",
    "value_curve",
    "with_train_counts",
]
