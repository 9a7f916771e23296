"""`fedclip partition --config X.yaml`: how the configured data and partitioner split the
samples among clients, without building a model.

Its parser has only the keys the command uses (seed, output_dir, data.*, --config, --out),
so `fedclip partition -h` shows those alone. A config file written for `fedclip fit` is
accepted as it is: its other sections (learner, federation, fabric, ...) are read and
ignored, never refused; an unknown top-level key is still an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedclip.config import DEFAULTS, FitConfig, check_config_files, plain_config
from fedclip.data.federated import DataConfig
from fedclip.errors import UsageError
from fedclip.parsing import command_parser, parse_args


@dataclass
class PartitionConfig:
    """The part of a run's config that decides the partition.

    Args:
        seed: seeds the partition.
        output_dir: where the .json and .png go (default stem: output_dir/partition-<dataset>).
        data: data set, partition and loaders.
    """

    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)


KEYS = tuple(PartitionConfig.__dataclass_fields__)
# keys of a `fedclip fit` config file that partition reads and ignores
IGNORED = (set(FitConfig.__dataclass_fields__) | {"resume", "progress"}) - set(KEYS)


def partition_parser() -> Any:
    from jsonargparse import ActionConfigFile

    parser = command_parser(
        "fedclip partition",
        "Show how the configured data and partitioner split the samples among clients: a "
        "per-client table, and a JSON summary plus a heatmap PNG of the client-by-class "
        "counts. A `fedclip fit` config is accepted; its other sections are ignored.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s)")
    parser.add_class_arguments(
        PartitionConfig, nested_key=None, fail_untyped=True, sub_configs=True
    )
    parser.set_defaults({k: v for k, v in DEFAULTS.items() if k.startswith("data.")})
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="path stem of the .json and .png (default: output_dir/partition-<dataset>)",
    )
    return parser


def _partition_part(path: str) -> str:
    """The YAML text of config file `path` without the sections partition ignores."""
    loaded = yaml.safe_load(Path(path).read_text())
    if not isinstance(loaded, dict):
        return path  # jsonargparse names the problem
    return yaml.safe_dump({k: v for k, v in loaded.items() if k not in IGNORED}, sort_keys=False)


def without_ignored_sections(argv: list[str]) -> list[str]:
    """argv with every --config file replaced by its partition part (as YAML text)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += ["--config", _partition_part(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + _partition_part(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def cmd_partition(argv: list[str]) -> int:
    from rich.console import Console

    from fedclip.data.federated import FederatedData
    from fedclip.report import partition_table, write_partition

    check_config_files(argv)
    parser = partition_parser()
    ns = parse_args(parser, without_ignored_sections(argv))
    plain_config(parser, ns)  # NaN, inf and out-of-range integers, by dotted key
    init = (
        parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
    )
    data = FederatedData(init.data, init.seed)
    summary = data.summary()
    out = Path(ns.out) if ns.out else Path(init.output_dir) / f"partition-{summary['dataset']}"
    title = f"{summary['dataset']}: {summary['partitioner']}, seed {init.seed}"
    Console().print(partition_table(summary, title))
    try:
        written = write_partition(summary, out.parent, out.name)
    except OSError as e:  # e.g. --out under a file, or a folder the user cannot write
        where = f" ({e.filename})" if e.filename and Path(e.filename) != out.parent else ""
        raise UsageError(f"--out {out}: cannot write it{where}: {e.strerror or e}") from e
    for path in written:
        print(f"wrote {path}")
    return 0
