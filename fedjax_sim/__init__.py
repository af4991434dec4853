"""fedjax_sim: a JAX simulator for personalized federated learning."""

__version__ = "0.1.0"
