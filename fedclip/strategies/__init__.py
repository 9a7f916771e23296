"""Federation strategies (see base.py for the contract)."""

from fedclip.strategies.base import ClientResult, Payload, Strategy, UploadError
from fedclip.strategies.fedavg import FedAvg, FedProx, LocalOnly, weighted_average
from fedclip.strategies.gpa import GaussianPromptAggregation, gaussian_weights
from fedclip.strategies.moap import PFedMoAP, select_experts

__all__ = [
    "ClientResult",
    "FedAvg",
    "FedProx",
    "GaussianPromptAggregation",
    "LocalOnly",
    "PFedMoAP",
    "Payload",
    "Strategy",
    "UploadError",
    "gaussian_weights",
    "select_experts",
    "weighted_average",
]
