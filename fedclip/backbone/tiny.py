"""Offline weights for fedclip's tiny architectures: contrastive pre-training on Shapes.

`backbone.pretrained: shapes` with `fedclip-tiny-vit` or `fedclip-tiny-rn` gives a backbone
that has actually learned image-text alignment (on the built-in coloured-shapes data, in its
"plain" style), so the offline demo shows what prompt learning does on a pretrained CLIP. The
quickstarts' clients hold the same kind of scenes under a shift (Shapes style "tungsten", a warm
colour cast never seen here): zero-shot starts above chance but far below the plain-style
accuracy, and learned prompts recover much of the gap. The weights are trained on first use (seconds on a
CPU, deterministic in the seed) and cached; nothing is downloaded. Importing this module
registers the tag (`fedclip.backbone.registry`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from fedclip.backbone.registry import register_model_configs, register_offline_weights
from fedclip.checkpoint import save_atomic
from fedclip.errors import BackboneError

log = logging.getLogger(__name__)

TAG = "shapes"
VERSION = 1
STEPS = 100  # about 20 s on 2 CPU cores; zero-shot accuracy on plain Shapes ends near 80%
TINY_MODELS = ("fedclip-tiny-vit", "fedclip-tiny-rn")
CAPTIONS = ("a photo of a {}.", "a {}.", "a drawing of a {}.", "a picture of a {}.")


def cache_path(model: str, cache_dir: str | None = None) -> Path:
    root = Path(cache_dir or os.environ.get("FEDCLIP_CACHE", Path.home() / ".cache" / "fedclip"))
    return root / f"{model}-{TAG}-v{VERSION}.pt"


def pretrain(
    model: str, steps: int | None = None, batch_size: int = 56, per_class: int = 12, seed: int = 0
) -> dict[str, torch.Tensor]:
    """CLIP's symmetric contrastive loss on Shapes images and captions of their class name.

    Each batch holds one image of every class (so no two pairs share a caption) with a
    random caption template; AdamW, `steps` steps. Returns the model's state_dict.
    """
    from fedclip.data.datasets import COLOURS, SHAPES, Shapes

    register_model_configs()
    steps = STEPS if steps is None else steps
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = open_clip.create_model(model)
    tokenizer = open_clip.get_tokenizer(model)
    size = net.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    preprocess = open_clip.image_transform(size, is_train=False)
    n_cls = min(batch_size, len(COLOURS) * len(SHAPES))
    # seed + 1000: the pre-training images are not the demo's images
    src = Shapes(
        num_classes=n_cls,
        train_per_class=per_class,
        test_per_class=1,
        image_size=size,
        seed=seed + 1000,
        style="plain",  # the quickstarts shift to "tungsten": never seen here
    )
    data = src.dataset("train", preprocess)
    images = torch.stack([data[i][0] for i in range(len(data))])  # (n_cls * per_class, 3, H, W)
    labels = torch.as_tensor(src.labels("train"))
    by_class = [torch.nonzero(labels == c).flatten() for c in range(n_cls)]
    names = src.classnames
    tokens = torch.stack([tokenizer([t.format(n) for n in names]) for t in CAPTIONS])  # (T, C, 77)

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    net.train()
    for _ in range(steps):
        pick = torch.stack(
            [idx[torch.randint(len(idx), (1,), generator=gen)] for idx in by_class]
        ).flatten()
        tmpl = torch.randint(len(CAPTIONS), (n_cls,), generator=gen)
        text = tokens[tmpl, torch.arange(n_cls)]  # (C, 77)
        img_f = F.normalize(net.encode_image(images[pick]), dim=-1)
        txt_f = F.normalize(net.encode_text(text), dim=-1)
        logits = net.logit_scale.exp() * img_f @ txt_f.t()  # (C, C)
        target = torch.arange(n_cls)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, 4.6052)
    log.info("pre-trained %s on Shapes: final contrastive loss %.3f", model, loss.item())
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def shapes_weights(model: str, cache_dir: str | None = None) -> str:
    """Path of the Shapes-pretrained checkpoint of a tiny model, training it on first use."""
    if model not in TINY_MODELS:
        raise BackboneError(
            f"pretrained '{TAG}' exists only for {', '.join(TINY_MODELS)}, not {model}"
        )
    path = cache_path(model, cache_dir)
    if not path.is_file():
        log.warning("pre-training %s on Shapes once (cached in %s)", model, path)
        save_atomic(pretrain(model), path)
    return str(path)


register_offline_weights(TAG, shapes_weights, TINY_MODELS)
