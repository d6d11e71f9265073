"""Conditioner networks: they produce the parameters of coupling functions and know
nothing about flows."""

from pyro_nf.nn.mlp import MLP, activation_module

__all__ = ["MLP", "activation_module"]
