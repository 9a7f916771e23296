"""Registries of what fedclip can build without the network: models, weights, tokenizers.

open_clip resolves architectures, pretrained tags and tokenizers by name, and most of its
tokenizers and all of its weights come from the internet. fedclip's offline pieces (the
tiny architectures of the tests and the demo, their Shapes-pretrained weights, the SigLIP
tokenizer stand-in) are entries in these registries; the loader looks a name up here first
and asks open_clip otherwise, so it never tests model names itself.

Register from a module of your own (import it before building the backbone):

    register_offline_model("my-tiny", Path("my-tiny.json"))  # an open_clip model config
    register_offline_weights("mine", my_weights, models=("my-tiny",))
    register_offline_tokenizer("my-tiny", lambda: MyTokenizer())

This module imports nothing of fedclip's backbone, so registering modules depend on it
alone (no import cycle with the loader).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip


@dataclass(frozen=True)
class OfflineModel:
    """An architecture open_clip learns from fedclip: `config` is its open_clip model config
    (JSON, its file name is the model name); `setup` runs once before open_clip builds it
    (e.g. registering the timm trunk the config names); `description` is for listings."""

    name: str
    config: Path
    setup: Callable[[], None] | None = None
    description: str = ""


@dataclass(frozen=True)
class OfflineWeights:
    """A pretrained tag that needs no download: `resolve(model, cache_dir)` returns a local
    checkpoint file of `model` (making it on first use if it must); `models` are the
    architectures the tag exists for."""

    tag: str
    resolve: Callable[[str, str | None], str]
    models: tuple[str, ...]


_MODELS: dict[str, OfflineModel] = {}
_WEIGHTS: dict[str, OfflineWeights] = {}
_TOKENIZERS: dict[str, Callable[[], object]] = {}
_added: set[str] = set()  # models whose config open_clip already has


def register_offline_model(
    name: str,
    config: str | Path,
    setup: Callable[[], None] | None = None,
    description: str = "",
) -> None:
    """Make `name` buildable offline from the open_clip model config file `config`.

    Raises ValueError when the file's name (open_clip's key) is not `name`."""
    config = Path(config)
    if config.stem != name:
        raise ValueError(f"open_clip names a model config by its file: {config.name} is not {name}")
    _MODELS[name] = OfflineModel(name, config, setup, description)


def register_offline_weights(
    tag: str, resolve: Callable[[str, str | None], str], models: tuple[str, ...]
) -> None:
    """Make `backbone.pretrained: <tag>` resolve locally for the architectures `models`."""
    _WEIGHTS[tag] = OfflineWeights(tag, resolve, tuple(models))


def register_offline_tokenizer(model: str, factory: Callable[[], object]) -> None:
    """Use `factory()` (open_clip's tokenizer interface: texts -> (N, L) int64 ids) as the
    tokenizer of `model` instead of open_clip's (which may need the Hugging Face hub)."""
    _TOKENIZERS[model] = factory


def list_offline_models() -> list[str]:
    """The names of the registered offline architectures, sorted."""
    return sorted(_MODELS)


def list_offline_weights() -> dict[str, tuple[str, ...]]:
    """Each registered offline pretrained tag and the architectures it exists for."""
    return {tag: w.models for tag, w in sorted(_WEIGHTS.items())}


def offline_model(name: str) -> OfflineModel | None:
    return _MODELS.get(name)


def offline_weights(tag: str) -> OfflineWeights | None:
    return _WEIGHTS.get(tag)


def offline_tokenizer(model: str) -> Callable[[], object] | None:
    return _TOKENIZERS.get(model)


def register_model_configs() -> None:
    """Make every registered offline architecture known to open_clip (`open_clip.list_models`,
    `open_clip.create_model`); cheap after the first call, and again after new ones are
    registered."""
    new = [m for name, m in _MODELS.items() if name not in _added]
    for model in new:
        if model.setup is not None:
            model.setup()
    for model in new:  # one file each: a folder would add every config in it
        open_clip.add_model_config(model.config)
    _added.update(m.name for m in new)
