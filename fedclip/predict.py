"""`fedclip predict --run_dir R IMAGE... [--top_k 5] [--client K]`: classify image files
with the trained prompts of a run, printing one line per image:

    shapes/0.png: red circle (91.2%), red square (4.1%), blue circle (2.0%)

The run is loaded as `fedclip evaluate` loads it (its config.yaml, then its checkpoint), and
client K's model is used as evaluation uses it: the client's own state (its personal
prompts, gating network, held experts, ...) after taking what the strategy gives it for
evaluation (under FedAvg / PromptFL the global context, under LocalOnly nothing). The
classes are those the clients trained on. Probabilities are a softmax over those classes
(multi-label data sets: each class's own sigmoid). A missing or unreadable image is one
line and exit code 2, before the run is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedclip.errors import UsageError
from fedclip.parsing import command_parser, parse_args


def predict_parser() -> Any:
    from fedclip.config import add_run_arguments

    parser = command_parser(
        "fedclip predict",
        "Classify image files with the trained prompts of a run: the top-k classes and "
        "their probabilities, one line per image.",
    )
    add_run_arguments(parser)
    parser.add_argument("images", type=str, nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top_k", type=int, default=5, help="classes shown per image")
    parser.add_argument(
        "--client",
        type=int,
        default=0,
        help="whose model: client K's personal prompts (with what its strategy gives it "
        "for evaluation, e.g. the global context of FedAvg), as `fedclip evaluate` uses them",
    )
    return parser


def read_image(path: str | Path) -> Any:
    """The RGB PIL image in file `path`; UsageError when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = "not an image file" if isinstance(e, UnidentifiedImageError) else str(e)
        raise UsageError(f"cannot read image {path}: {reason}") from e


def load_client_learner(run_dir: str | Path, client: int = 0, checkpoint: str | None = None):
    """The learner of client `client` of a run folder, as evaluation uses it (its state
    from the checkpoint plus its evaluation payload), in eval mode."""
    from fedclip.config import read_run_config
    from fedclip.federation import Federation
    from fedclip.federation.devices import fall_back_to_cpu

    run_dir = Path(run_dir)
    cfg, plain = read_run_config(run_dir)
    cfg.fabric.devices = cfg.fabric.num_nodes = 1  # this one process
    fall_back_to_cpu(cfg, "predict")  # a run trained on a GPU this machine lacks
    fed = Federation(cfg, None, plain, show_progress=False)
    fed.load(checkpoint or run_dir / "checkpoints" / "last.ckpt")
    n = fed.info.num_clients
    if not 0 <= client < n:
        raise UsageError(f"--client {client}: the run has {n} clients (0..{n - 1})")
    payload = fed.strategy.configure_evaluate(fed.round, [client]).get(client)
    fed.runtime.take(client, payload)
    return fed.runtime.clients[client].learner.eval()


def format_top(path: str, probs: Any, classnames: list[str], top_k: int) -> str:
    """`path: class (p%), class (p%), ...` for one image's probabilities (C,)."""
    values, ids = probs.topk(min(top_k, len(classnames)))
    shown = ", ".join(
        f"{classnames[int(c)]} ({100 * float(p):.1f}%)"
        for p, c in zip(values.tolist(), ids.tolist(), strict=True)
    )
    return f"{path}: {shown}"


def cmd_predict(argv: list[str]) -> int:
    ns = parse_args(predict_parser(), argv)
    if ns.top_k < 1:
        raise UsageError(f"--top_k must be >= 1, got {ns.top_k}")
    images = [read_image(p) for p in ns.images]  # a bad file fails before the run loads
    learner = load_client_learner(ns.run_dir, ns.client, ns.checkpoint)
    probs = learner.predict(images).cpu()
    for path, row in zip(ns.images, probs, strict=True):
        print(format_top(path, row, learner.classnames, ns.top_k))
    return 0
