"""Federation strategies (see base.py for the contract)."""

from fedclip.strategies.base import ClientResult, Payload, Strategy
from fedclip.strategies.fedavg import FedAvg, FedProx, LocalOnly, weighted_average

__all__ = [
    "ClientResult",
    "FedAvg",
    "FedProx",
    "LocalOnly",
    "Payload",
    "Strategy",
    "weighted_average",
]
