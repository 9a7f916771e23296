"""Bad input, continued: config files that are not mappings, non-finite and out-of-range
numbers, sentence templates, resumes that change a federation key, and --out paths that
cannot be written. Every case runs like those of tests/test_bad_input.py (same workspace,
same checks: exit code 2, one line naming the problem, every file byte for byte unchanged)."""

from __future__ import annotations

import inspect
import shutil
import types
import typing

import pytest
import yaml

from fedclip.cli import main
from fedclip.config import FitConfig, fit_parser, plain_config
from fedclip.errors import ConfigError

from .test_bad_input import Case, _snapshot, _write, fit, offline, ws  # noqa: F401

MVP = "--learner=fedclip.learners.FedMVP"
ZS = "--learner=fedclip.learners.ZeroShot"
MOAP = ("--learner=fedclip.learners.MixtureOfPrompts", "--strategy=fedclip.strategies.PFedMoAP")


@pytest.fixture(scope="module")
def cws(ws):  # noqa: F811
    """The bad-input workspace plus this module's files: bad config files, and run folders
    (with the base run's checkpoint) whose config.yaml is bad."""
    root = ws.root / "cfg"
    files = {
        "empty.yaml": "",
        "comment.yaml": "# nothing here\n",
        "list.yaml": "- seed: 1\n- seed: 2\n",
        "scalar.yaml": "3\n",
        "string.yaml": "just some words\n",
        "binary.yaml": b"\xff\xfe\x00\x89PNG\x80garbage",
        "latin1.yaml": "seed: 1\nrun_name: caf\xe9\n".encode("latin-1"),
        "data_list.yaml": "data: [1, 2]\n",
        "init_args_list.yaml": "learner:\n  init_args: [1, 2]\n",
        "dotted_init_args.yaml": "learner.init_args: [1, 2]\n",
        "federation_int.yaml": "federation: 3\n",
        "optim_str.yaml": "optim: fast\n",
        "strategy_list.yaml": "strategy: [a, b]\n",
        "dataset_int.yaml": "data:\n  dataset: 5\n",
        "partitioner_args.yaml": "data:\n  partitioner:\n    class_path: fedclip.data.IID\n"
        "    init_args: 1\n",
        "lr_nan.yaml": "optim:\n  lr: .nan\n",
        "mu_nan.yaml": "strategy:\n  class_path: fedclip.strategies.FedProx\n"
        "  init_args:\n    mu: .nan\n",
        "alpha_inf.yaml": "data:\n  partitioner:\n    class_path: fedclip.data.Dirichlet\n"
        "    init_args:\n      alpha: .inf\n",
        "clip_ninf.yaml": "privacy:\n  mode: local\n  clip_norm: -.inf\n",
        "huge_clients.yaml": f"data:\n  num_clients: {2**70}\n",
        "huge_rounds.yaml": f"federation:\n  rounds: {2**64}\n",
    }
    for name, text in files.items():
        _write(root / name, text)
    saved = yaml.safe_load((ws.base / "config.yaml").read_text())
    ckpt = (ws.base / "checkpoints" / "last.ckpt").read_bytes()
    runs = root / "runs"

    def run_folder(name: str, config: str | bytes) -> None:
        _write(runs / name / "config.yaml", config)
        _write(runs / name / "checkpoints" / "last.ckpt", ckpt)

    def changed(**over) -> str:
        cfg = yaml.safe_load(yaml.safe_dump(saved))
        for key, value in over.items():
            *path, leaf = key.split("__")
            node = cfg
            for p in path:
                node = node[p]
            node[leaf] = value
        return yaml.safe_dump(cfg, sort_keys=False)

    run_folder("empty", "")
    run_folder("list", "- 1\n- 2\n")
    run_folder("binary", b"\x80\x81\x82")
    run_folder("data_list", changed(data=[1, 2]))
    run_folder("lr_nan", changed(optim__lr=float("nan")))
    run_folder("seed_big", changed(seed=2**64))
    run_folder(
        "template",
        changed(
            learner={
                "class_path": "fedclip.learners.ZeroShot",
                "init_args": {"templates": ["a {foo} {}"]},
            }
        ),
    )
    _write(root / "file", "a regular file\n")
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(root / "red.png")
    (root / "folder").mkdir()
    (root / "clash.png").mkdir()  # partition --out {cfg}/clash: its .png is a folder
    return ws


def esc(text: str) -> str:
    """Text with its braces kept through Case's placeholder filling (str.format)."""
    return text.replace("{", "{{").replace("}", "}}")


def cfg(name: str) -> str:
    return "{ws}/cfg/" + name


def run(name: str) -> str:
    return "{ws}/cfg/runs/" + name


def cfg_fit(name: str, *args: str, needle) -> Case:
    return Case(["--config", "{tiny}", "--config", cfg(name), *args], needle)


TOP = "expected a mapping of settings at the top level"
NOT_MAPPING = [
    # ---- fit --config
    pytest.param(cfg_fit("empty.yaml", needle=("empty.yaml", TOP, "empty file")), id="fit-empty"),
    pytest.param(cfg_fit("comment.yaml", needle=("comment.yaml", TOP)), id="fit-only-comments"),
    pytest.param(cfg_fit("list.yaml", needle=("list.yaml", TOP, "a list")), id="fit-list"),
    pytest.param(cfg_fit("scalar.yaml", needle=("scalar.yaml", TOP, "integer")), id="fit-scalar"),
    pytest.param(cfg_fit("string.yaml", needle=("string.yaml", TOP, "string")), id="fit-string"),
    pytest.param(cfg_fit("binary.yaml", needle=("binary.yaml", "UTF-8", "0xff")), id="fit-binary"),
    pytest.param(cfg_fit("latin1.yaml", needle=("latin1.yaml", "UTF-8")), id="fit-latin1"),
    pytest.param(
        cfg_fit("data_list.yaml", needle=("data_list.yaml", "section 'data'", "a list")),
        id="fit-data-list",
    ),
    pytest.param(
        cfg_fit("init_args_list.yaml", needle=("section 'learner.init_args'", "a list")),
        id="fit-init-args-list",
    ),
    pytest.param(
        cfg_fit("dotted_init_args.yaml", needle=("section 'learner.init_args'", "a list")),
        id="fit-dotted-init-args-list",
    ),
    pytest.param(
        cfg_fit("federation_int.yaml", needle=("section 'federation'", "integer")),
        id="fit-federation-int",
    ),
    pytest.param(
        cfg_fit("optim_str.yaml", needle=("section 'optim'", "string")), id="fit-optim-string"
    ),
    pytest.param(
        cfg_fit("strategy_list.yaml", needle=("section 'strategy'", "class path")),
        id="fit-strategy-list",
    ),
    pytest.param(
        cfg_fit("dataset_int.yaml", needle=("section 'data.dataset'", "integer")),
        id="fit-dataset-int",
    ),
    pytest.param(
        cfg_fit("partitioner_args.yaml", needle="section 'data.partitioner.init_args'"),
        id="fit-partitioner-init-args-int",
    ),
    # ---- partition --config
    *(
        pytest.param(
            Case(["--config", cfg(name)], (name, *needle), cmd="partition"), id=f"partition-{name}"
        )
        for name, needle in (
            ("empty.yaml", (TOP,)),
            ("list.yaml", (TOP, "a list")),
            ("binary.yaml", ("UTF-8",)),
            ("data_list.yaml", ("section 'data'",)),
            ("dataset_int.yaml", ("section 'data.dataset'",)),
        )
    ),
    # ---- a run folder's config.yaml: evaluate, export, predict, --resume
    *(
        pytest.param(
            Case([*pre, "--run_dir", run(name), *post], (f"{name}/config.yaml", needle), cmd=cmd),
            id=f"{cmd}-run-config-{name}",
        )
        for cmd, pre, post in (
            ("evaluate", [], []),
            ("export", [], []),
            ("predict", [], ["{ws}/cfg/red.png"]),
        )
        for name, needle in (
            ("empty", TOP),
            ("list", TOP),
            ("binary", "UTF-8"),
            ("data_list", "section 'data'"),
        )
    ),
    *(
        pytest.param(
            Case(
                [
                    "--config",
                    "{tiny}",
                    "--output_dir={ws}/cfg/runs",
                    f"--run_name={name}",
                    "--resume=true",
                    "--progress=false",
                ],
                (f"{name}/config.yaml", needle),
                new_run=False,
            ),
            id=f"resume-saved-config-{name}",
        )
        for name, needle in (("list", TOP), ("binary", "UTF-8"), ("data_list", "section 'data'"))
    ),
]

NUMBERS = [
    # ---- YAML .nan / .inf / -.inf
    pytest.param(cfg_fit("lr_nan.yaml", needle=("optim.lr", "finite", "nan")), id="yaml-lr-nan"),
    pytest.param(
        cfg_fit("mu_nan.yaml", needle=("strategy.init_args.mu", "nan")), id="yaml-fedprox-mu-nan"
    ),
    pytest.param(
        cfg_fit("alpha_inf.yaml", needle=("data.partitioner.init_args.alpha", "inf")),
        id="yaml-dirichlet-alpha-inf",
    ),
    pytest.param(
        cfg_fit("clip_ninf.yaml", needle=("privacy.clip_norm", "-inf")), id="yaml-clip-norm-ninf"
    ),
    pytest.param(
        cfg_fit("huge_clients.yaml", needle=("data.num_clients", str(2**70))),
        id="yaml-num-clients-2**70",
    ),
    pytest.param(
        cfg_fit("huge_rounds.yaml", needle=("federation.rounds", str(2**64))),
        id="yaml-rounds-2**64",
    ),
    # ---- the command line
    pytest.param(fit("--optim.lr=.inf", needle=("optim.lr", "inf")), id="flag-lr-inf"),
    pytest.param(fit("--optim.lr=nan", needle="optim.lr"), id="flag-lr-nan-word"),
    pytest.param(fit("--optim.momentum=.nan", needle="optim.momentum"), id="flag-momentum-nan"),
    pytest.param(fit("--optim.weight_decay=-.inf", needle="optim.weight_decay"), id="flag-wd-ninf"),
    pytest.param(
        fit("--federation.fraction=.nan", needle="federation.fraction"), id="flag-fraction-nan"
    ),
    pytest.param(
        fit(
            "--strategy=fedclip.strategies.FedProx",
            "--strategy.init_args.mu=.nan",
            needle="strategy.init_args.mu",
        ),
        id="flag-fedprox-mu-nan",
    ),
    pytest.param(
        fit(
            "--privacy.mode=local",
            "--privacy.noise_multiplier=.nan",
            needle="privacy.noise_multiplier",
        ),
        id="flag-noise-nan",
    ),
    pytest.param(fit("--privacy.delta=.inf", needle="privacy.delta"), id="flag-delta-inf"),
    pytest.param(
        fit("--multilabel.gamma_neg=.nan", needle="multilabel.gamma_neg"), id="flag-asl-nan"
    ),
    pytest.param(
        fit(MVP, "--learner.init_args.alpha=.nan", needle="learner.init_args.alpha"),
        id="flag-mvp-alpha-nan",
    ),
    pytest.param(
        fit(MVP, "--learner.init_args.sigma=.inf", needle="learner.init_args.sigma"),
        id="flag-mvp-sigma-inf",
    ),
    pytest.param(
        fit(
            *MOAP,
            "--learner.init_args.gating_momentum=.nan",
            needle="learner.init_args.gating_momentum",
        ),
        id="flag-moap-gating-momentum-nan",
    ),
    pytest.param(fit("--seed=-1", needle=("seed", "2**32", "-1")), id="seed-negative"),
    pytest.param(fit(f"--seed={2**32}", needle=("seed", str(2**32))), id="seed-2**32"),
    pytest.param(fit(f"--seed={2**64}", needle=("seed", str(2**64))), id="seed-2**64"),
    pytest.param(
        fit("--data.dataset.init_args.seed=-5", needle="data.dataset.init_args.seed"),
        id="dataset-seed-negative",
    ),
    pytest.param(
        fit(f"--data.batch_size={2**63}", needle="data.batch_size"), id="batch-size-2**63"
    ),
    pytest.param(
        fit(f"--federation.local_epochs={-(2**70)}", needle="federation.local_epochs"),
        id="local-epochs-huge-negative",
    ),
    # ---- partition
    pytest.param(
        Case(["--config", "{tiny}", "--seed=-1"], "seed", cmd="partition"), id="partition-seed"
    ),
    pytest.param(
        Case(
            ["--config", cfg("alpha_inf.yaml")], "data.partitioner.init_args.alpha", cmd="partition"
        ),
        id="partition-alpha-inf",
    ),
    pytest.param(
        Case(["--config", cfg("huge_clients.yaml")], "data.num_clients", cmd="partition"),
        id="partition-num-clients-huge",
    ),
    # ---- a run folder's config.yaml
    *(
        pytest.param(
            Case([*pre, "--run_dir", run(name), *post], (f"{name}/config.yaml", key), cmd=cmd),
            id=f"{cmd}-run-config-{name}",
        )
        for cmd, pre, post in (
            ("evaluate", [], []),
            ("export", [], []),
            ("predict", [], ["{ws}/cfg/red.png"]),
        )
        for name, key in (("lr_nan", "optim.lr"), ("seed_big", "seed"))
    ),
]

TEMPLATES = [
    *(
        pytest.param(
            fit(MVP, f"--learner.init_args.{arg}={esc(value)}", needle=(arg, *map(esc, needle))),
            id=f"mvp-{arg}-{i}",
        )
        for i, (arg, value, needle) in enumerate(
            (
                ("template", "a photo of a {classname}.", ("{attribute}",)),
                ("template", "{foo} {classname} {attribute}", ("{foo}",)),
                ("template", "a {classname} with {attribute", ("not a valid template",)),
                ("template", "a {classname} }{attribute}", ("not a valid template",)),
                ("template", "a {0} with {attribute}", ("{0}", "positional")),
                ("template", "a {classname!r} with {attribute}", ("conversion",)),
                ("template", "a {classname.upper} with {attribute}", ("{classname.upper}",)),
                ("negative_template", "a photo without a {foo}.", ("{foo}",)),
                ("negative_template", "a photo without a {classname", ("not a valid",)),
                ("negative_template", "a photo without anything", ("{classname}",)),
                ("fallback_templates", "['a photo of a {}.']", ("fallback_templates[0]", "{}")),
                ("fallback_templates", "['a {classname}', 'b {x}']", ("fallback_templates[1]",)),
                ("fallback_templates", "['}{classname}']", ("not a valid",)),
                ("fallback_templates", "[]", ("at least one",)),
            )
        )
    ),
    *(
        pytest.param(
            fit(ZS, f"--learner.init_args.{arg}={esc(value)}", needle=(arg, *map(esc, needle))),
            id=f"zeroshot-{arg}-{i}",
        )
        for i, (arg, value, needle) in enumerate(
            (
                ("templates", "[a photo of a thing]", ("templates[0]", "{}")),
                ("templates", "['a {foo} {}']", ("{foo}",)),
                ("templates", "['a {']", ("not a valid",)),
                ("templates", "['ok {}', 'a {1} {}']", ("templates[1]", "{1}")),
                ("templates", "[]", ("at least one",)),
                ("negative_templates", "['}{}']", ("negative_templates[0]", "not a valid")),
                ("negative_templates", "['a {classname}']", ("{classname}",)),
            )
        )
    ),
    pytest.param(
        Case(["--run_dir", run("template")], ("template/config.yaml", "{{foo}}"), cmd="evaluate"),
        id="evaluate-run-config-template",
    ),
    pytest.param(
        Case(["--run_dir", run("template")], "{{foo}}", cmd="export"),
        id="export-run-config-template",
    ),
]

RESUME = [
    pytest.param(
        Case(
            ["--config", "{base}/config.yaml", f"--{key}={value}", "--resume=true"],
            (key, f"saved {saved}", f"given {value}"),
            new_run=False,
        ),
        id=f"resume-{key}",
    )
    for key, saved, value in (
        ("federation.local_epochs", 1, 2),
        ("federation.eval_at_start", "False", "True"),
        ("federation.fraction", "1.0", "0.5"),
    )
]

OUT = [
    pytest.param(
        Case(
            ["--run_dir", "{base}", "--out", "/proc/x.safetensors"],
            "/proc/x.safetensors",
            cmd="export",
        ),
        id="export-out-proc",
    ),
    pytest.param(
        Case(
            ["--run_dir", "{base}", "--out", "{ws}/cfg/file/x.safetensors"],
            "{ws}/cfg/file/x.safetensors",
            cmd="export",
        ),
        id="export-out-under-file",
    ),
    pytest.param(
        Case(
            ["--run_dir", "{base}", "--out", "{ws}/cfg/file/deep/x.safetensors"],
            "{ws}/cfg/file",
            cmd="export",
        ),
        id="export-out-deep-under-file",
    ),
    pytest.param(
        Case(
            ["--run_dir", "{base}", "--out", "{ws}/cfg/folder"],
            ("{ws}/cfg/folder", "folder"),
            cmd="export",
        ),
        id="export-out-existing-folder",
    ),
    pytest.param(
        Case(["--config", "{tiny}", "--out", "/proc/p"], "/proc/p", cmd="partition"),
        id="partition-out-proc",
    ),
    pytest.param(
        Case(
            ["--config", "{tiny}", "--out", "{ws}/cfg/file/p"], "{ws}/cfg/file/p", cmd="partition"
        ),
        id="partition-out-under-file",
    ),
    pytest.param(
        Case(["--config", "{tiny}", "--out", "{ws}/cfg/clash"], "{ws}/cfg/clash", cmd="partition"),
        id="partition-out-png-is-a-folder",
    ),
]


def _check(ws, case, capsys):  # noqa: F811
    capsys.readouterr()
    before = _snapshot(ws.root)
    code = main(case.argv(ws))
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr:\n{out.err}"
    assert len(lines) == 1 and lines[0].startswith(f"fedclip {case.cmd}: error: "), out.err
    line = lines[0]
    assert line.isprintable(), f"control characters in {line!r}"
    for needle in case.needles(ws):
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not (ws.runs / "new").exists(), "a refused fit created its run folder"
    assert _snapshot(ws.root) == before, "a bad-input case changed the workspace"
    return line


@pytest.mark.parametrize("case", NOT_MAPPING)
def test_config_not_a_mapping(cws, case, capsys, offline):  # noqa: F811
    _check(cws, case, capsys)


@pytest.mark.parametrize("case", NUMBERS)
def test_numbers(cws, case, capsys, offline):  # noqa: F811
    _check(cws, case, capsys)


@pytest.mark.parametrize("case", TEMPLATES)
def test_templates(cws, case, capsys, offline):  # noqa: F811
    _check(cws, case, capsys)


@pytest.mark.parametrize("case", RESUME)
def test_resume_names_the_federation_key(cws, case, capsys, offline):  # noqa: F811
    _check(cws, case, capsys)


@pytest.mark.parametrize("case", OUT)
def test_out_path(cws, case, capsys, offline):  # noqa: F811
    line = _check(cws, case, capsys)
    assert "/." not in line, f"a temporary file is named: {line!r}"


# ---- every float argument of every configurable class -----------------------------------
def _float_args(cls) -> list[str]:
    """Names of the float (or float | None) arguments of a class or dataclass."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    out = []
    for name in inspect.signature(cls.__init__).parameters:
        tp = hints.get(name)
        args = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        if float in args:
            out.append(name)
    return out


def _plugins():
    import fedclip.data as data
    import fedclip.data.partition as partition
    import fedclip.learners as learners
    import fedclip.strategies as strategies
    from fedclip.data.partition.base import Partitioner
    from fedclip.data.source import DatasetSource
    from fedclip.learners.base import PromptLearner
    from fedclip.strategies.base import Strategy

    for key, module, base in (
        ("learner", learners, PromptLearner),
        ("strategy", strategies, Strategy),
        ("data.partitioner", partition, Partitioner),
        ("data.dataset", data, DatasetSource),
    ):
        for name in dir(module):
            cls = getattr(module, name)
            if inspect.isclass(cls) and issubclass(cls, base) and not inspect.isabstract(cls):
                for arg in _float_args(cls):
                    path = f"{module.__name__}.{name}"
                    yield [f"--{key}={path}"], f"{key}.init_args.{arg}"


def _sections():
    hints = typing.get_type_hints(FitConfig)
    for section, tp in hints.items():
        if hasattr(tp, "__dataclass_fields__"):
            for arg in _float_args(tp):
                yield [], f"{section}.{arg}"


FLOAT_KEYS = [*_plugins(), *_sections()]


def test_the_float_catalogue_is_broad():
    keys = {k for _, k in FLOAT_KEYS}
    assert len(keys) >= 15, keys
    assert {"optim.lr", "strategy.init_args.mu", "privacy.clip_norm"} <= keys


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_argument_refuses_non_finite(value):
    parser = fit_parser()
    for pre, key in FLOAT_KEYS:
        ns = parser.parse_args([*pre, f"--{key}={value}"])
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            plain_config(parser, ns)


def test_flower_server_reads_the_same_checks(tmp_path, ws):  # noqa: F811
    pytest.importorskip("flwr")
    from fedclip.flower.server import RunOptions, read_config

    with pytest.raises(ConfigError, match=r"optim\.lr"):
        read_config(RunOptions(config=str(ws.tiny), overrides="--optim.lr=.nan"), None)
    with pytest.raises(ConfigError, match="seed"):
        read_config(RunOptions(config=str(ws.tiny), overrides="--seed=-1"), None)
    bad = _write(tmp_path / "list.yaml", "- 1\n")
    with pytest.raises(Exception, match="expected a mapping"):
        read_config(RunOptions(config=str(bad)), None)


# ---- legitimate input still works --------------------------------------------------------
def test_legitimate_numbers_and_templates_parse():
    parser = fit_parser()
    for argv in (
        ["--seed=0"],
        [f"--seed={2**32 - 1}"],
        ["--optim.lr=1e-3", "--optim.momentum=0"],
        ["--federation.max_client_failures=null"],
        [MVP, "--learner.init_args.template=a {{literal}} {classname} with {attribute}."],
        [ZS, "--learner.init_args.templates=['a photo of a {}.', 'art of the {}.']"],
    ):
        plain_config(parser, parser.parse_args(argv))
    from fedclip.learners import FedMVP, ZeroShot

    ZeroShot(templates=["a {{x}} {}"])
    FedMVP(template="{classname}: {attribute}", negative_template="no {classname}")


def test_attribute_braces_are_literal_text():
    from fedclip.data.attributes import attribute_sentences

    sentences, _ = attribute_sentences(["cat"], [["has {paws} and }"]])
    assert sentences == ["a photo of a cat, which has has {paws} and }."]


def test_legitimate_out_paths_and_resume(ws, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "new" / "deeper" / "prompts.safetensors"
    assert main(["export", "--run_dir", str(ws.base), "--out", str(out)]) == 0
    assert out.is_file() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    stem = tmp_path / "parts" / "p"
    assert main(["partition", "--config", str(ws.tiny), "--out", str(stem)]) == 0
    assert sorted(p.name for p in stem.parent.iterdir()) == ["p.json", "p.png"]
    run = tmp_path / "runs" / "base"
    shutil.copytree(ws.base, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["output_dir"] = str(tmp_path / "runs")
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    # the resumable keys may change: rounds, eval_every, max_client_failures, logger.*
    code = main(
        [
            "fit",
            "--config",
            str(run / "config.yaml"),
            "--federation.rounds=2",
            "--federation.max_client_failures=1",
            "--logger.project=other",
            "--resume=true",
            "--progress=false",
        ]
    )
    assert code == 0, capsys.readouterr().err
