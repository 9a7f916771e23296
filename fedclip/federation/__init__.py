"""The round loop, once for every backend, and what it is made of.

- `RoundLoop` (loop.py): the server side of every round.
- Executors (executors.py): where the turns run (`LocalExecutor`, `FabricExecutor`; the
  Flower executor lives in fedclip.flower).
- `ClientRuntime` (runtime.py): the client side of a turn, the same on every backend.
- `ClientOutcome`, `RoundRecord`, `Upload` (records.py): typed round records.
- `Federation` (inprocess.py): a run in this process or on its Fabric ranks.
"""

from fedclip.errors import ClientFailure, FederationError
from fedclip.federation.executors import (
    Executor,
    FabricExecutor,
    FederationInfo,
    LocalExecutor,
    assign_clients,
)
from fedclip.federation.inprocess import Federation, build_fabric, build_runtime, prepare_data
from fedclip.federation.loop import RoundLoop, make_loggers, sample_clients
from fedclip.federation.records import (
    ClientOutcome,
    RoundRecord,
    Upload,
    failure_reason,
    tensor_bytes,
    to_cpu,
)
from fedclip.federation.runtime import ClientRuntime, Stopped, turn_seed
from fedclip.federation.settings import (
    RESUMABLE_KEYS,
    check_config,
    config_fingerprint,
    without_resumable,
)

__all__ = [
    "RESUMABLE_KEYS",
    "ClientFailure",
    "ClientOutcome",
    "ClientRuntime",
    "Executor",
    "FabricExecutor",
    "Federation",
    "FederationError",
    "FederationInfo",
    "LocalExecutor",
    "RoundLoop",
    "RoundRecord",
    "Stopped",
    "Upload",
    "assign_clients",
    "build_fabric",
    "build_runtime",
    "check_config",
    "config_fingerprint",
    "failure_reason",
    "make_loggers",
    "prepare_data",
    "sample_clients",
    "tensor_bytes",
    "to_cpu",
    "turn_seed",
    "without_resumable",
]
