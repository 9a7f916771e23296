"""The shipped suites (configs/suites/): every one parses and names its reference numbers'
source; without data or weights each stops before any cell with one line per missing piece;
and each runs end to end on tiny models and fake data trees in the data sets' real on-disk
layouts (through `--override`, as a user points a suite at local copies), producing its
table. The quick suite's reduced copy runs every registered method offline.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedclip.cli import main
from fedclip.methods import get_method, list_methods
from tests.test_coop import aircraft, caltech, cars, dtd, flowers, food, pets, sun, ucf

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "configs" / "suites"
SHIPPED = sorted(p.stem for p in SUITES.glob("*.yaml"))
PAPER = [s for s in SHIPPED if s != "quick"]
TINY = [  # every cell on fedclip's tiny ViT with random weights, one short round, on the CPU
    "--override=--backbone.model=fedclip-tiny-vit",
    "--override=--backbone.pretrained=null",
    "--override=--fabric.accelerator=cpu",
    "--override=--fabric.precision=32-true",
    "--override=--federation.rounds=1",
    "--override=--federation.local_epochs=1",
    "--override=--federation.eval_every=1",
    "--override=--data.num_workers=0",
    "--override=--data.batch_size=4",
    "--override=--data.eval_batch_size=16",
]


def load(name: str) -> dict:
    return yaml.safe_load((SUITES / f"{name}.yaml").read_text())


def reduced_copy(name: str, folder: Path, **changes) -> Path:
    """The shipped suite `name` written into `folder` with its base config's path made
    absolute, each registry method's tiny-backbone arguments (`Method.tiny_args`) added to
    its overrides, and `changes` (e.g. seeds) applied."""
    spec = load(name)
    spec["base"] = str((SUITES / spec["base"]).resolve())
    for entry in spec["methods"]:
        if "method" in entry:
            tiny = get_method(entry["method"]).tiny_args
            flags = [f"--learner.init_args.{k}={json.dumps(v)}" for k, v in tiny.items()]
            entry["overrides"] = [*entry.get("overrides", []), *flags]
    spec.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def table_rows(suite_dir: Path) -> list[dict[str, str]]:
    with open(suite_dir / "suite.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- every shipped suite ----------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_suite_prints_its_commands(name, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["suite", "--config", str(SUITES / f"{name}.yaml"), "--print-commands",
                 f"--output_dir={out}"]) == 0  # fmt: skip
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fedclip fit")]
    spec = load(name)
    methods = len(list_methods()) if name == "quick" else len(spec["methods"])
    assert len(lines) == methods * len(spec.get("settings") or [None]) * len(spec["seeds"])
    assert not (out / spec["name"] / "runs").exists()  # nothing ran


@pytest.mark.parametrize("name", PAPER)
def test_paper_suites_name_their_reference(name):
    spec = load(name)
    ref = spec["reference"]
    assert ref["source"] and ref["values"]
    rows = {m["name"] for m in spec["methods"]}
    columns = {s["name"] for s in spec["settings"]}
    for row, values in ref["values"].items():
        assert row in rows
        assert set(values) <= columns


@pytest.mark.parametrize("name", PAPER)
def test_paper_suite_without_data_names_every_missing_piece(name, tmp_path):
    """Run as on a fresh machine (an empty Hugging Face cache, no hub): nothing runs, and
    every data set of the suite and its weights get a line each."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-m", "fedclip.cli", "suite", "--config", str(SUITES / f"{name}.yaml"),
         f"--output_dir={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "missing" in ln]
    spec = load(name)
    expected = {
        "pfedmoap_table1": ["flowers", "pets", "food-101", "caltech-101", "dtd"],
        "pfedmoap_table2": ["cifar-10", "cifar-100"],
        "fedmvp_b2n": ["caltech-101", "oxford_flowers", "fgvc_aircraft", "ucf101",
                       "oxford_pets", "food-101", "dtd", "stanford_cars", "sun397"],
    }[name]  # fmt: skip
    for folder in expected:
        assert any(folder in ln.lower() for ln in lines), (folder, lines)
    assert any(ln for ln in lines if "weights" in ln), lines
    assert len(lines) == len(set(lines))  # each piece once, however many cells need it
    assert not (tmp_path / "out" / spec["name"] / "runs").exists()


# ---- the paper suites on fake trees -----------------------------------------------------------
def coop_trees(root: Path, writers) -> None:
    for write in writers:
        write(root)


@pytest.mark.slow
def test_pfedmoap_table1_on_fake_trees(tmp_path):
    data = tmp_path / "data"
    coop_trees(data, [lambda r: caltech(r, True), lambda r: pets(r, True),
                      lambda r: flowers(r, "zhou"), lambda r: food(r, "zhou"),
                      lambda r: dtd(r, "zhou")])  # fmt: skip
    suite = reduced_copy("pfedmoap_table1", tmp_path, seeds=[0])
    args = [*TINY, f"--override=--data.dataset.init_args.root={data}",
            "--override=--data.num_clients=2", "--override=--data.partitioner.init_args.shots=2"]  # fmt: skip
    assert main(["suite", "--config", str(suite), f"--output_dir={tmp_path / 'out'}",
                 "--jobs=2", *args]) == 0  # fmt: skip
    check_table(tmp_path / "out" / "pfedmoap_table1", load("pfedmoap_table1"))


CIFAR_MD5 = """# the fake CIFAR files cannot match the published archives' md5: check that they exist
import os
import torchvision.datasets.cifar as cifar
cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
"""


@pytest.mark.slow
def test_pfedmoap_table2_on_fake_trees(tmp_path, monkeypatch, skip_md5):
    from tests.test_datasets import write_cifar10, write_cifar100

    data = tmp_path / "data"
    write_cifar10(data)
    write_cifar100(data)
    hook = tmp_path / "hook"  # the cells are processes of their own: patch them at start-up
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CIFAR_MD5)
    path = os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    suite = reduced_copy("pfedmoap_table2", tmp_path, seeds=[0, 1])
    args = [*TINY, f"--override=--data.dataset.init_args.root={data}",
            "--override=--data.dataset.init_args.download=false",
            "--override=--data.num_clients=2", "--override=--federation.fraction=1.0",
            "--override=--data.partitioner.init_args.min_size=1"]  # fmt: skip
    assert main(["suite", "--config", str(suite), f"--output_dir={tmp_path / 'out'}",
                 "--jobs=2", *args]) == 0  # fmt: skip
    check_table(tmp_path / "out" / "pfedmoap_table2", load("pfedmoap_table2"), seeds=2)


NINE = {  # fedmvp_b2n's data sets: class path -> the fake tree's writer
    "Caltech101": lambda r: caltech(r, True),
    "Flowers102": lambda r: flowers(r, "zhou"),
    "FGVCAircraft": lambda r: aircraft(r, trainval=False),
    "UCF101": lambda r: ucf(r, "zhou"),
    "OxfordPets": lambda r: pets(r, True),
    "Food101": lambda r: food(r, "zhou"),
    "DTD": lambda r: dtd(r, "zhou"),
    "StanfordCars": lambda r: cars(r, True),
    "SUN397": lambda r: sun(r, "zhou"),
}


@pytest.mark.slow
def test_fedmvp_b2n_on_fake_trees(tmp_path):
    data = tmp_path / "data"
    coop_trees(data, NINE.values())
    members = [
        {"class_path": f"fedclip.data.{name}", "init_args": {"root": str(data)}} for name in NINE
    ]
    suite = reduced_copy("fedmvp_b2n", tmp_path, seeds=[1])
    args = [*TINY, f"--override=--data.dataset.init_args.datasets={json.dumps(members)}",
            "--override=--data.partitioner.init_args.classes_per_client=2",
            "--override=--data.partitioner.init_args.shots=2",
            "--override=--fabric.precision=32-true"]  # fmt: skip
    assert main(["suite", "--config", str(suite), f"--output_dir={tmp_path / 'out'}",
                 "--jobs=2", *args]) == 0  # fmt: skip
    check_table(tmp_path / "out" / "fedmvp_b2n", load("fedmvp_b2n"))


# ---- the quick suite ---------------------------------------------------------------------------
def test_quick_suite_covers_every_registered_method():
    spec = load("quick")
    assert spec["methods"] == [{"registered": "*", "config": "quickstart"}]
    assert len(spec["seeds"]) == 2
    assert all(get_method(n).quickstart for n in list_methods())


@pytest.mark.slow
def test_quick_suite_reduced_copy_runs_every_method(tmp_path):
    suite = reduced_copy("quick", tmp_path)
    # one round of one epoch; the quickstarts' training data stays (their Dirichlet
    # partitions keep at least 20 samples per client)
    args = ["--override=--federation.rounds=1", "--override=--federation.local_epochs=1",
            "--override=--data.dataset.init_args.test_per_class=6"]  # fmt: skip
    assert main(["suite", "--config", str(suite), f"--output_dir={tmp_path / 'out'}",
                 "--jobs=2", *args]) == 0  # fmt: skip
    spec = load("quick")
    spec["methods"] = [{"name": n} for n in list_methods()]
    check_table(tmp_path / "out" / "quick", spec, seeds=2)


def check_table(suite_dir: Path, spec: dict, seeds: int = 1) -> None:
    """Every (method, setting, metric) of `spec` has its row in suite.csv, each run over
    `seeds` seeds, with the reference number the suite file gives; the other files exist."""
    for name in ("suite.md", "suite.tex", "suite.png", "suite.csv"):
        assert (suite_dir / name).is_file(), name
    rows = table_rows(suite_dir)
    metrics = spec.get("metrics") or [None]
    settings = [s["name"] for s in spec.get("settings") or []]
    reference = (spec.get("reference") or {}).get("values", {})
    md = (suite_dir / "suite.md").read_text()
    for method in spec["methods"]:
        mine = [r for r in rows if r["row"] == method["name"]]
        assert method["name"] in md
        for setting in settings or [None]:
            for metric in metrics:
                cell = [
                    r for r in mine
                    if (setting is None or r["column"] == setting)
                    and (metric is None or r["metric"] == metric)
                ]  # fmt: skip
                assert len(cell) == 1, (method, setting, metric, mine)
                assert int(cell[0]["n"]) == seeds
                assert 0.0 <= float(cell[0]["mean"]) <= 100.0
                ref = reference.get(method["name"], {}).get(setting)
                if isinstance(ref, dict):
                    ref = ref.get(metric)
                if ref is not None:
                    assert float(cell[0]["reference"]) == pytest.approx(ref)
                    assert f"{ref:.2f}" in md
