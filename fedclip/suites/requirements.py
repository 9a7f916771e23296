"""What a cell needs before it runs: its data on disk and its backbone's weights.

`missing_pieces(cfg)` lists, one line each, what a fit of `cfg` (a built fit config)
would stop on: a data set (each member of a `MultiDataset` on its own line, naming the
folder it was looked for in) and pre-trained weights that are neither in the local cache
nor downloadable from here. A suite calls it for every cell before it starts any, so a
machine without the data learns everything it lacks at once instead of one cell at a time.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from fedclip.errors import FedclipError, one_line

HUB_HOST = "https://huggingface.co"
TIMEOUT_S = 5.0


def missing_pieces(cfg) -> list[str]:
    """One line per missing piece of the fit config `cfg` (empty: nothing is missing)."""
    lines = [*missing_data(cfg.data.dataset)]
    weights = missing_weights(cfg.backbone)
    if weights is not None:
        lines.append(weights)
    return lines


def missing_data(source) -> list[str]:
    """`source.check()`'s line, or each member's for a data set made of several."""
    from fedclip.data.multi import MultiDataset

    if isinstance(source, MultiDataset):
        return [line for member in source.sources for line in missing_data(member)]
    try:
        source.check()
    except FedclipError as e:
        name = getattr(source, "name", type(source).__name__)
        return [f"data set {name}: {one_line(str(e))}"]
    return []


def missing_weights(backbone) -> str | None:
    """`weights_line` of the backbone config, asked once per model, tag and cache."""
    return weights_line(backbone.model, backbone.pretrained, backbone.cache_dir)


@functools.cache
def weights_line(model: str, pretrained: str | None, cache_dir: str | None) -> str | None:
    """None when the weights can be loaded here: none (random), fedclip's
    offline ones, a local file, or an open_clip tag whose file is in the cache or can be
    downloaded now; otherwise the line saying which weights and where they were sought."""
    import open_clip

    from fedclip.backbone.config import BackboneConfig, check_model_name, resolve_pretrained
    from fedclip.backbone.registry import offline_weights

    offline = offline_weights(pretrained) if pretrained else None
    if offline is not None and model in offline.models:
        return None  # built here on first use (fedclip's tiny models), never downloaded
    backbone = BackboneConfig(model=model, pretrained=pretrained, cache_dir=cache_dir)
    what = f"weights {model} / {pretrained}"
    try:
        check_model_name(backbone.model)
        tag = resolve_pretrained(backbone)
    except FedclipError as e:
        return f"{what}: {one_line(str(e))}"
    if tag is None or Path(tag).is_file():
        return None
    pcfg = open_clip.get_pretrained_cfg(backbone.model, tag) or {}
    if "file" in pcfg:
        return None if Path(pcfg["file"]).is_file() else f"{what}: no file {pcfg['file']}"
    hub, url = pcfg.get("hf_hub", ""), pcfg.get("url", "")
    if hub:
        if _in_hub_cache(hub, backbone.cache_dir) or _hub_reachable(hub):
            return None
        where = f"the Hugging Face cache ({backbone.cache_dir or _hub_cache()}) lacks {hub}"
    elif url:
        cache = backbone.cache_dir or os.path.expanduser("~/.cache/clip")
        if (Path(cache) / os.path.basename(url)).is_file() or _url_reachable(url):
            return None
        where = f"{cache} lacks {os.path.basename(url)}"
    else:
        return None  # nothing to fetch: open_clip's own call will say what is wrong
    return (
        f"{what}: {where} and they cannot be downloaded from here; fetch them on a machine "
        "with internet (HF_HOME or backbone.cache_dir) or set backbone.pretrained to a local file"
    )


def _hub_files(hub: str) -> tuple[str, list[str]]:
    """The repository and the file names open_clip tries for an `hf_hub` entry."""
    repo, filename = os.path.split(hub)  # "org/model/": the default file names
    if not filename:
        return repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    names = [filename]
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return repo, names


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _in_hub_cache(hub: str, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo, names = _hub_files(hub)
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str) and Path(found).is_file():
            return True
    return False


def _hub_reachable(hub: str) -> bool:
    """Whether the hub answers for the weights' file now (False in HF_HUB_OFFLINE mode)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    repo, names = _hub_files(hub)
    for name in names:
        try:
            get_hf_file_metadata(hf_hub_url(repo, name), timeout=TIMEOUT_S)
            return True
        except Exception:  # offline mode, no route, a missing alternative: try the next
            continue
    return False


def _url_reachable(url: str) -> bool:
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "") not in {"", "0"}:
        return False
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=TIMEOUT_S):
            return True
    except Exception:
        return False
