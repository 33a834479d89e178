"""fedke: collaborative (federated) knowledge editing of LLMs on Flower.

Clients edit their private requests with a knowledge editor (MEMIT) and send only per-layer
payloads (Delta, K K^T); :mod:`fedke.strategies` merges them (CollabEdit, FedAvg,
TaskArithmetic, TIES). See the README for the two commands that get you started.
"""

__version__ = "0.1.0"
