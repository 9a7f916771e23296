"""Federation strategies (see base.py for the contract)."""

from fedclip.strategies.base import ClientResult, Payload, Strategy, UploadError
from fedclip.strategies.fedavg import FedAvg, FedProx, LocalOnly, weighted_average
from fedclip.strategies.moap import PFedMoAP, select_experts

__all__ = [
    "ClientResult",
    "FedAvg",
    "FedProx",
    "LocalOnly",
    "PFedMoAP",
    "Payload",
    "Strategy",
    "UploadError",
    "select_experts",
    "weighted_average",
]
