"""Every registered method under the two protocols of unseen data that the conformance
suite does not run: leave-one-domain-out (train on three PACS domains, test on the fourth)
and cross-dataset transfer (`fedclip evaluate --dataset`: the global part among another
data set's classes). Each gives its metrics in [0, 1], or is refused in one line."""

from __future__ import annotations

import pytest

from fedclip.data import PACS, LeaveOneDomainOut, Shapes
from fedclip.data.federated import DataConfig
from fedclip.federation import Federation
from fedclip.methods import list_methods

from .test_conformance import config, works_or_is_refused
from .test_domains import make_pacs


@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    make_pacs(root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list_methods())
def test_leave_one_domain_out_and_transfer(name, pacs_root):
    cfg = config(name, rounds=1)
    cfg.data = DataConfig(
        dataset=PACS(root=str(pacs_root)),
        partitioner=LeaveOneDomainOut("sketch"),
        num_clients=3,
        batch_size=8,
    )
    works_or_is_refused(cfg, "eval/global")
    fed = Federation(config(name, rounds=1), None, show_progress=False)
    fed.fit()
    source = Shapes(num_classes=3, train_per_class=2, test_per_class=4, image_size=32, seed=5)
    fed.data.add_transfer("other", source)
    metrics = fed.evaluate_transfer("other")
    assert 0.0 <= metrics["transfer/other/acc"] <= 1.0
    assert sum(k.startswith("transfer/other/client/") for k in metrics) == fed.data.num_clients
