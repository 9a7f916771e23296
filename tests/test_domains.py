"""Multi-domain data sets read from tiny fakes in their real layouts, and the domain partitioners
on them.

Every fake image is one solid colour that encodes its (domain, class), so each test can check
that every item's label and domain are those of its image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclip.data.datasets import DataError
from fedclip.data.domains import (
    FEDBN10,
    PACS,
    VLCS,
    DomainNet,
    OfficeCaltech10,
    OfficeHome,
    TerraIncognita,
)
from fedclip.data.partition import (
    ByDomain,
    DomainDirichlet,
    FewShot,
    LeaveOneDomainOut,
    partition_summary,
)
from fedclip.errors import ConfigError


def colour(domain: int, cls: int) -> tuple[int, int, int]:
    return (20 + 40 * domain, 15 + 18 * cls, 128)


def decode(image: Image.Image) -> tuple[int, int]:
    """(domain, class) indices of an image drawn with `colour`."""
    r, g, _ = np.asarray(image, dtype=float).reshape(-1, 3).mean(0)
    d, c = round((r - 20) / 40), round((g - 15) / 18)
    assert abs(r - colour(d, c)[0]) < 8 and abs(g - colour(d, c)[1]) < 8, "not a fake colour"
    return d, c


def draw(path: Path, domain: int, cls: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour(domain, cls)).save(path, quality=95)


def make_tree(
    folder: Path,
    all_domains: tuple[str, ...],
    domains: list[str],
    classes: list[str],
    per_class: int = 5,
    skip: tuple[tuple[str, str], ...] = (),
) -> None:
    """folder/<domain>/<class>/img_<j>.jpg, colour (index in all_domains, index in classes)."""
    for dom in domains:
        for c, cls in enumerate(classes):
            if (dom, cls) in skip:
                continue
            for j in range(per_class):
                draw(folder / dom / cls / f"img_{j}.jpg", all_domains.index(dom), c)
    (folder / "README.txt").write_text("not a domain")  # stray files are ignored


def check_items(src, split: str, classes: list[str]) -> None:
    """Every item: its label and domain are those its image encodes; arrays aligned."""
    labels, domains = src.labels(split), src.domains(split)
    assert labels.dtype == np.int64 and domains.dtype == np.int64
    ds = src.dataset(split, None)
    assert len(ds) == len(labels) == len(domains) > 0
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.mode == "RGB" and label == labels[i]
        d, c = decode(image)
        assert src.domain_names[domains[i]] == type(src).all_domains[d]
        assert src.classnames[label] == classes[c].replace("_", " ")


# ---------------------------------------------------------------------------------------------
# Folder data sets with a seeded split

# (class, folder, domains on disk, classes on disk, class with no images in a domain)
SEEDED = [
    (OfficeCaltech10, "office_caltech_10", None, ["mug", "back_pack", "laptop_computer"], ()),
    (OfficeHome, "office_home", ["Art", "Real World"], ["Push_Pin", "Alarm_Clock", "TV"], ()),
    (VLCS, "VLCS", ["Caltech101", "VOC2007"], ["person", "bird", "car"], (("VOC2007", "bird"),)),
    (TerraIncognita, "terra_incognita", None, ["empty", "bobcat", "coyote"], ()),
    (PACS, "pacs", None, ["dog", "elephant", "giraffe"], ()),  # no split lists: seeded
]
SEEDED_IDS = [s[0].__name__ for s in SEEDED]


@pytest.mark.parametrize("cls,folder,domains,classes,skip", SEEDED, ids=SEEDED_IDS)
def test_seeded_split_data_sets(cls, folder, domains, classes, skip, tmp_path):
    on_disk = domains or list(cls.all_domains)
    make_tree(tmp_path / folder, cls.all_domains, on_disk, classes, skip=skip)
    src = cls(root=str(tmp_path), domains=domains)
    src.check()
    assert src.domain_names == on_disk
    assert src.classnames == [c.replace("_", " ") for c in sorted(classes)], "sorted folders"
    for split in ("train", "test"):
        check_items(src, split, classes)
    train, test = src.dataset("train", None).items, src.dataset("test", None).items
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert len(train) + len(test) == len(on_disk) * len(classes) * 5 - 5 * len(skip)
    for d in range(len(on_disk)):  # 20% of every class of every domain is test: 1 of 5
        counts = np.bincount(src.labels("test")[src.domains("test") == d], minlength=3)
        assert sorted(counts.tolist())[-1] == 1 and counts.sum() >= 2
    for dom in on_disk:
        saved = tmp_path / folder / f"fedclip_split_{dom.replace(' ', '_')}.json"
        assert saved.is_file(), "the seeded split is saved next to the data"
    again = cls(root=str(tmp_path), domains=domains)
    assert again.key("train") == src.key("train") and again.key("test") == src.key("test")
    np.testing.assert_array_equal(again.labels("test"), src.labels("test"))


def test_seeded_split_is_reused(tmp_path):
    classes = ["mug", "bike"]
    make_tree(tmp_path / "office_caltech_10", OfficeCaltech10.all_domains, ["dslr"], classes)
    src = OfficeCaltech10(root=str(tmp_path), domains=["dslr"])
    before = src.dataset("test", None).items
    saved = tmp_path / "office_caltech_10" / "fedclip_split_dslr.json"
    split = json.loads(saved.read_text())
    moved = split["train"].pop(0)  # hand-edit the saved split: it must win over a redraw
    split["test"].append(moved)
    saved.write_text(json.dumps(split))
    after = OfficeCaltech10(root=str(tmp_path), domains=["dslr"])
    assert len(after.labels("test")) == len(before) + 1
    assert moved[0] in {p for p, _ in after.dataset("test", None).items}
    check_items(after, "test", classes)
    assert after.key("test") != src.key("test"), "the key follows the content"


def test_domain_subset(tmp_path):
    classes = ["mug", "bike"]
    make_tree(tmp_path / "office_caltech_10", OfficeCaltech10.all_domains, ["amazon"], classes)
    make_tree(tmp_path / "office_caltech_10", OfficeCaltech10.all_domains, ["webcam"], classes)
    src = OfficeCaltech10(root=str(tmp_path), domains=["webcam", "amazon"])
    assert src.domain_names == ["amazon", "webcam"], "the data set's domain order"
    assert set(src.domains("train").tolist()) == {0, 1}
    check_items(src, "train", classes)
    assert "amazon+webcam" in src.key("train")
    with pytest.raises(DataError, match="caltech"):  # all domains: caltech is not on disk
        OfficeCaltech10(root=str(tmp_path)).check()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"domains": ["amazon", "photo"]}, "unknown domain 'photo'; its domains are amazon"),
        ({"domains": []}, "non-empty"),
        ({"domains": "amazon"}, "non-empty list"),
        ({"domains": ["dslr", "dslr"]}, "repeats"),
        ({"domains": 3}, "non-empty list"),
    ],
)
def test_bad_domains(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        OfficeCaltech10(**kwargs)


@pytest.mark.parametrize(
    "cls,folder,url",
    [
        (DomainNet, "domainnet", "http://ai.bu.edu/M3SDA/"),
        (OfficeCaltech10, "office_caltech_10", "jindongwang/transferlearning"),
        (PACS, "pacs", "https://domaingeneralization.github.io/#data"),
        (OfficeHome, "office_home", "https://www.hemanthdv.org/officeHomeDataset.html"),
        (VLCS, "VLCS", "https://github.com/facebookresearch/DomainBed"),
        (TerraIncognita, "terra_incognita", "https://github.com/facebookresearch/DomainBed"),
    ],
)
def test_missing_root(cls, folder, url, tmp_path):
    src = cls(root=str(tmp_path))  # constructing reads nothing
    with pytest.raises(DataError) as e:
        src.check()
    message = str(e.value)
    assert "\n" not in message
    assert cls.title in message and str(tmp_path / folder) in message and url in message


def test_empty_domain_folder(tmp_path):
    (tmp_path / "VLCS" / "SUN09" / "car").mkdir(parents=True)
    with pytest.raises(DataError, match="no images under"):
        VLCS(root=str(tmp_path), domains=["SUN09"]).check()


# ---------------------------------------------------------------------------------------------
# PACS with the official kfold lists

PACS_IDS = {"giraffe": 1, "dog": 2, "elephant": 3}  # 1-based; not alphabetical on purpose


def make_pacs(root: Path, with_lists: bool = True) -> None:
    classes = list(PACS_IDS)
    for d, dom in enumerate(PACS.all_domains):
        ext = ".png" if dom == "sketch" else ".jpg"  # PACS sketches are PNG files
        train, test = [], []
        for c, cls in enumerate(classes):
            for j in range(5):
                rel = f"{dom}/{cls}/pic_{j:03d}{ext}"
                draw(root / "pacs" / rel, d, c)
                line = f"{rel} {PACS_IDS[cls]}"
                test.append(line)  # the official test list is the whole domain
                if j < 4:
                    train.append(line)
        if with_lists:
            (root / "pacs" / "splits").mkdir(parents=True, exist_ok=True)
            (root / "pacs" / "splits" / f"{dom}_train_kfold.txt").write_text("\n".join(train))
            (root / "pacs" / "splits" / f"{dom}_test_kfold.txt").write_text("\n".join(test[::-1]))


def test_pacs_official_lists(tmp_path):
    make_pacs(tmp_path)
    src = PACS(root=str(tmp_path))
    src.check()
    assert src.classnames == ["giraffe", "dog", "elephant"], "order of the lists' label ids"
    for split in ("train", "test"):
        check_items(src, split, list(PACS_IDS))
    train = {p for p, _ in src.dataset("train", None).items}
    test = [p for p, _ in src.dataset("test", None).items]
    assert len(train) == 4 * 3 * 4 and len(test) == 4 * 3
    assert all(p.split("/")[-1].startswith("pic_004") for p in test), "test = list - train"
    assert not train & set(test)
    assert not list((tmp_path / "pacs").glob("fedclip_split_*")), "no seeded split needed"


def test_pacs_bad_lists(tmp_path):
    make_pacs(tmp_path)
    lists = tmp_path / "pacs" / "splits"
    (lists / "cartoon_test_kfold.txt").unlink()
    with pytest.raises(DataError, match="cartoon_test_kfold.txt"):
        PACS(root=str(tmp_path)).check()
    make_pacs(tmp_path)
    with open(lists / "photo_train_kfold.txt", "a") as f:  # an image filed under another id
        f.write("\nphoto/dog/pic_000.jpg 1\n")
    with pytest.raises(DataError, match="does not match its image folders"):
        PACS(root=str(tmp_path)).check()
    make_pacs(tmp_path)
    (lists / "photo_train_kfold.txt").write_text("photo/dog/pic_000.jpg 2\nphoto/horse/x.jpg 2")
    with pytest.raises(DataError, match="label 1 names both 'dog' and 'horse'"):
        PACS(root=str(tmp_path), domains=["photo"]).check()
    (lists / "photo_train_kfold.txt").write_text("photo/dog/pic_000.jpg 0")  # labels from 1
    with pytest.raises(DataError, match="photo_train_kfold.txt:1"):
        PACS(root=str(tmp_path), domains=["photo"]).check()
    (lists / "photo_train_kfold.txt").write_bytes(b"photo/dog/\xff\xfe.jpg 1")  # not UTF-8
    with pytest.raises(DataError, match="cannot read .*photo_train_kfold.txt") as info:
        PACS(root=str(tmp_path), domains=["photo"]).check()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# DomainNet

DN_DOMAINS = ["clipart", "painting", "real"]
# label ids of the official lists: not the alphabetical order, with two classes beyond FedBN's
DN_IDS = {c: i for i, c in enumerate(["zebra", "aircraft_carrier", *FEDBN10[:-1]])}
DN_IDS["The_Eiffel_Tower"] = 11
DN_CLASSES = list(DN_IDS)  # colour index = position here


def make_domainnet(root: Path, domains=DN_DOMAINS, train: int = 3, test: int = 2) -> None:
    folder = root / "domainnet"
    for dom in domains:
        d = DomainNet.all_domains.index(dom)
        lines = {"train": [], "test": []}
        for c, cls in enumerate(DN_CLASSES):
            for j in range(train + test):
                rel = f"{dom}/{cls}/{dom}_{c:03d}_{j:06d}.jpg"
                draw(folder / rel, d, c)
                lines["train" if j < train else "test"].append(f"{rel} {DN_IDS[cls]}")
        for split, ls in lines.items():
            (folder / f"{dom}_{split}.txt").write_text("\n".join(ls) + "\n")


@pytest.fixture(scope="module")
def domainnet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dn")
    make_domainnet(root)
    return root


def test_domainnet_fedbn10(domainnet_root):
    src = DomainNet(root=str(domainnet_root), domains=DN_DOMAINS)
    src.check()
    by_id = sorted(FEDBN10, key=DN_IDS.get)
    assert src.classnames == [c.replace("_", " ") for c in by_id], "label-id order"
    assert "ice cream" in src.classnames and "wine glass" in src.classnames
    assert src.domain_names == DN_DOMAINS
    for split, per_class in (("train", 3), ("test", 2)):
        check_items(src, split, DN_CLASSES)
        counts = np.bincount(src.labels(split) * 3 + src.domains(split))
        assert np.all(counts == per_class), "every (class, domain) pair, all its images"
    assert src.key("train").startswith("domainnet-clipart+painting+real-fedbn10/train-")


def test_domainnet_classes(domainnet_root):
    root = str(domainnet_root)
    every = DomainNet(root=root, domains=DN_DOMAINS, classes="all")
    assert every.classnames[:2] == ["zebra", "aircraft carrier"]
    assert every.classnames[-1] == "The Eiffel Tower" and len(every.classnames) == 12
    check_items(every, "test", DN_CLASSES)
    two = DomainNet(root=root, domains=["real"], classes=["ice cream", "zebra"])
    assert two.classnames == ["zebra", "ice cream"], "label-id order, not the list's"
    assert two.domain_names == ["real"] and set(two.domains("train").tolist()) == {0}
    check_items(two, "train", DN_CLASSES)
    fedbn = DomainNet(root=root, domains=DN_DOMAINS)
    assert len({every.key("train"), two.key("train"), fedbn.key("train")}) == 3
    with pytest.raises(DataError, match="class 'unicorn'"):
        DomainNet(root=root, domains=["real"], classes=["zebra", "unicorn"]).check()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"classes": "fedbn"}, "classes must be 'fedbn10', 'all' or a list"),
        ({"classes": []}, "non-empty list"),
        ({"classes": ["zebra", "zebra"]}, "repeats"),
        ({"domains": ["clipart", "photo"]}, "unknown domain 'photo'; its domains are clipart"),
        ({"classes": 10}, "classes must be 'fedbn10', 'all' or a list"),
        ({"classes": ["zebra", None]}, "classes must be 'fedbn10', 'all' or a list"),
    ],
)
def test_domainnet_bad_args(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DomainNet(**kwargs)


def test_domainnet_missing_parts(tmp_path):
    make_domainnet(tmp_path, domains=["clipart"], train=1, test=1)
    with pytest.raises(DataError, match="DomainNet domain 'infograph' not found"):
        DomainNet(root=str(tmp_path)).check()
    (tmp_path / "domainnet" / "clipart_test.txt").unlink()
    with pytest.raises(DataError, match="clipart_test.txt"):
        DomainNet(root=str(tmp_path), domains=["clipart"]).check()
    (tmp_path / "domainnet" / "clipart_test.txt").write_text("clipart/bird/b.jpg 0\n")
    with pytest.raises(DataError, match="'bird' has label 0 in clipart_test.txt but 2 in the"):
        DomainNet(root=str(tmp_path), domains=["clipart"]).check()
    lines = "clipart/zebra/a.jpg 0\nclipart/bird/b.jpg 0\n"  # one id, two classes
    (tmp_path / "domainnet" / "clipart_train.txt").write_text(lines)
    (tmp_path / "domainnet" / "clipart_test.txt").write_text(lines)
    with pytest.raises(DataError, match="label 0 names both"):
        DomainNet(root=str(tmp_path), domains=["clipart"]).check()
    (tmp_path / "domainnet" / "clipart_test.txt").write_text("real/zebra/a.jpg 0\n")
    with pytest.raises(DataError, match="clipart_test.txt:1"):
        DomainNet(root=str(tmp_path), domains=["clipart"]).check()


# ---------------------------------------------------------------------------------------------
# The domain partitioners on DomainNet, end to end


def client_images_ok(src, split: str, part: np.ndarray, domain: int) -> None:
    ds, labels, domains = src.dataset(split, None), src.labels(split), src.domains(split)
    assert len(part) > 0 and np.all(domains[part] == domain)
    for i in part:
        image, label = ds[int(i)]
        d, c = decode(image)
        assert label == labels[i] and src.classnames[label] == DN_CLASSES[c].replace("_", " ")
        assert src.domain_names[domain] == DomainNet.all_domains[d]


@pytest.mark.parametrize(
    "partitioner,num_clients",
    [
        (ByDomain(), 3),
        (DomainDirichlet(alpha=0.5, clients_per_domain=2, min_size=2), 6),
        (FewShot(1, ByDomain(2)), 6),
        (LeaveOneDomainOut("painting"), 2),
        (LeaveOneDomainOut("clipart", clients_per_domain=2), 4),
    ],
    ids=["by-domain", "domain-dirichlet", "fewshot-by-domain", "lodo", "lodo-2"],
)
def test_domain_partitioners_on_domainnet(partitioner, num_clients, domainnet_root):
    src = DomainNet(root=str(domainnet_root), domains=DN_DOMAINS)
    p = partitioner.bind(src)
    train_labels, test_labels = src.labels("train"), src.labels("test")
    train_domains, test_domains = src.domains("train"), src.domains("test")
    parts = p(train_labels, num_clients, seed=0, domains=train_domains)
    tests = p.split_test(parts, train_labels, test_labels, 0, train_domains, test_domains)
    owner = p.domain_of_clients(train_domains, num_clients)
    held_out = getattr(p, "held_out", None)
    for k in range(num_clients):
        client_images_ok(src, "train", parts[k], owner[k])
        client_images_ok(src, "test", tests[k], owner[k] if held_out is None else held_out)
    together = np.concatenate(tests)
    assert len(np.unique(together)) == len(together)
    if held_out is not None:
        assert held_out not in owner
        np.testing.assert_array_equal(np.sort(together), np.flatnonzero(test_domains == held_out))
    elif not isinstance(p, FewShot):
        assert sum(len(x) for x in parts) == len(train_labels)
        n = len(src.classnames)
        train_held = partition_summary(parts, train_labels, n) > 0
        np.testing.assert_array_equal(partition_summary(tests, test_labels, n) > 0, train_held)


def test_pfedmoap_domainnet_config_runs_by_domain(tmp_path, capsys):
    """The shipped DomainNet config, one round on a fake tree of all six domains: one client
    per domain, each trained and tested on its own domain only."""
    from .conftest import fit_shipped_config_offline

    make_domainnet(tmp_path / "data", domains=list(DomainNet.all_domains), train=2, test=1)
    summary = fit_shipped_config_offline("pfedmoap_domainnet.yaml", tmp_path)
    assert [c["domain"] for c in summary["clients"]] == list(DomainNet.all_domains)
    assert all(c["train"] == 10 * 2 and c["test"] == 10 for c in summary["clients"])
    part = json.loads((tmp_path / "runs" / "offline" / "partition.json").read_text())
    assert part["dataset"].startswith("domainnet") and len(part["classnames"]) == 10
