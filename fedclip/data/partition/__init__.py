"""Partitioners: split a data set's samples among simulated clients.

A partitioner is a pure function of the labels (and the domains, for the domain partitioners),
the number of clients and a seed. It checks its own arguments when constructed, checks
feasibility before drawing anything, and owns its random generator
(`np.random.default_rng(seed)`), so a partition never depends on global RNG state or on what
ran before it. Every partitioner returns disjoint, sorted int64 index arrays, one per client.

- `IID`: shuffle and cut into near-equal parts.
- `Dirichlet`: label skew, per-class client proportions drawn from Dir(alpha).
- `TwoLevelDirichlet`: label skew over class groups, then inside each group (CIFAR-100).
- `Pathological`: each client sees only `classes_per_client` classes.
- `FewShot`: any partition above, then at most `shots` samples per class per client.
- `PathologicalFewShot`: C / num_clients disjoint classes per client, `shots` of each.
- `ClassChunks`: each data set's classes cut into consecutive chunks, one client per chunk
  (FedTPG), `shots` of each class; the number of clients follows from the data.

Domain shift (the data set gives every sample a domain id, passed as `domains=`):

- `ByDomain`: every client holds one domain, `clients_per_domain` clients per domain, the
  domain's samples divided by an inner partitioner.
- `DomainDirichlet`: `ByDomain` with Dirichlet label skew inside each domain.
- `LeaveOneDomainOut`: clients train on all domains but one and are all tested on that one.

`Partitioner.split_test` gives each client its test samples: by default `split_like`, a test
split with the client's train label distribution; the domain partitioners keep it in the
client's domain (or the held-out one). `partition_summary` counts the labels each client holds.
"""

from fedclip.data.partition.base import Partitioner
from fedclip.data.partition.chunks import ClassChunks
from fedclip.data.partition.domain import ByDomain, DomainDirichlet, LeaveOneDomainOut
from fedclip.data.partition.label import IID, Dirichlet, TwoLevelDirichlet
from fedclip.data.partition.pathological import FewShot, Pathological, PathologicalFewShot
from fedclip.data.partition.summary import partition_summary, split_like

__all__ = [
    "IID",
    "ByDomain",
    "ClassChunks",
    "Dirichlet",
    "DomainDirichlet",
    "FewShot",
    "LeaveOneDomainOut",
    "Partitioner",
    "Pathological",
    "PathologicalFewShot",
    "TwoLevelDirichlet",
    "partition_summary",
    "split_like",
]
