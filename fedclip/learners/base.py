"""PromptLearner: the extension point for prompt-learning methods.

The contract (every method implements or inherits each part; nothing is guessed):

- `setup(clip, classnames, seed)` binds the learner to the shared frozen backbone and the
  class names, and builds its parameters (deterministic in `seed`). Learners are built by
  one factory, `make_learner`, in the round loop, on a Flower node and for exports alike.
- `inputs`: the `Input`s its batches must hold (pooled cached features by default; raw
  images, cached dense tokens, flip targets); the data layer feeds exactly those.
- `forward(batch) -> logits (B, C)`, `training_loss(batch) -> scalar`. `predict(images)`
  (inherited) gives class probabilities of images alone, building the batch its `inputs`
  need.
- `shared_keys()`: the tensors that are uploaded, declared by every learner (there is no
  default: a personalised method that forgot would upload its personal part), and
  `personal_keys()`: the trainable tensors that never leave the client. Every trainable
  tensor is in exactly one of the two (`check_contract`). `load_shared_state(state)` loads
  a download (a subset of the shared keys, same shapes).
- `accepts_extras` / `receive(extras)`: the learner-specific downloads it takes (pFedMoAP's
  experts); a strategy that sends an extra no learner accepts is refused at config time.
- `global_part()`: a context in which the learner computes with its global part alone
  (what the server's aggregate defines, without the client's personal tensors); the
  global protocol (`eval/global`, base-to-novel's base and novel, cross-dataset transfer)
  evaluates under it. A learner with personal parts says what its global part is
  (`global_description`) and reads `using_global` where it computes; one without them is
  its own global part.
- `client_id`: the id of the client the learner belongs to (set by `make_learner`; None
  for a learner built outside a federation), for methods whose clients differ by design
  (e.g. per-client prompt lengths); `num_train`: its client's training-sample count (set
  by the client; None outside a federation), for per-sample privacy accounting.
- `report()`: the learner's own per-round values (numbers are logged as `client/K/NAME`,
  lists of ids go to the summary's client rows).
- `end_of_round(loss) -> bool`: True when the trainable set changed (the client then
  rebuilds its optimizers; the schedule continues where it was).
- `invalidate_cache()`: drop what was derived from the current prompts (after loading
  tensors from outside).
- Everything not shared is personal state: it stays on the client, persists across rounds
  and is saved in checkpoints (parameters, buffers, `get_extra_state`).

The backbone is held by reference, never registered as a submodule, so it is neither
copied, trained, nor written into the learner's state_dict.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch, Input
from fedclip.errors import ConfigError, ContractError
from fedclip.learners.optim import (  # noqa: F401  (re-exported: learners import them from here)
    OptimConfig,
    RunCosine,
    build_sgd,
    continue_schedule,
    optimizer_for,
)


@dataclass
class MultiLabelConfig:
    """Multi-label recognition (used when the data set is multi-label).

    Args:
        loss: 'asl' (asymmetric loss, Ridnik et al., ICCV 2021) or 'bce'.
        gamma_pos: ASL focusing exponent of the positives.
        gamma_neg: ASL focusing exponent of the negatives.
        clip: ASL probability margin shifted off the negatives.
    """

    loss: Literal["asl", "bce"] = "asl"
    gamma_pos: float = 0.0
    gamma_neg: float = 4.0
    clip: float = 0.05

    def __post_init__(self) -> None:
        for name in ("gamma_pos", "gamma_neg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"multilabel.{name} must be >= 0 and finite, got {value}")
        if not 0 <= self.clip < 1:
            raise ConfigError(f"multilabel.clip must be in [0, 1), got {self.clip}")


def asymmetric_loss(
    logits: Tensor, targets: Tensor, gamma_pos: float, gamma_neg: float, clip: float
) -> Tensor:
    """ASL: -[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)], p_m = max(p - clip, 0); summed
    over classes, averaged over the batch. gamma 0 and clip 0 give BCE."""
    p = torch.sigmoid(logits)
    p_m = (p - clip).clamp(min=0) if clip > 0 else p
    eps = 1e-8
    pos = targets * (1 - p).pow(gamma_pos) * torch.log(p.clamp(min=eps))
    neg = (1 - targets) * p_m.pow(gamma_neg) * torch.log((1 - p_m).clamp(min=eps))
    return -(pos + neg).sum(-1).mean()


class PromptLearner(nn.Module):
    """Base class of prompt learners (see the module docstring for the contract).

    inputs: what its batches hold (see `fedclip.batch.Input`).
    accepts_extras: the payload extras `receive` takes.
    supports_multilabel / supports_base_to_novel: whether the learner can run those tasks;
    a config that asks for one it cannot is refused with one line.
    """

    inputs: ClassVar[frozenset[Input]] = frozenset({Input.FEATURES})
    accepts_extras: ClassVar[frozenset[str]] = frozenset()
    supports_multilabel: ClassVar[bool] = True
    supports_base_to_novel: ClassVar[bool] = True
    # what `global_part()` computes with, in a few words (README, summary.json)
    global_description: ClassVar[str] = "the model itself (it has no personal part)"

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_clip", None)
        self.client_id: int | None = None
        self.num_train: int | None = None
        self._global = False
        self.classnames: list[str] = []
        self._eval_text: Tensor | None = None
        self.multilabel = False
        self.multilabel_cfg = MultiLabelConfig()

    def set_task(self, multilabel: bool, cfg: MultiLabelConfig | None = None) -> None:
        """Single-label (softmax over classes) or multi-label (a binary decision per class
        from a positive and a negative text feature); called before `setup`. A learner
        without multi-label support refuses it here, in one line naming it."""
        if multilabel and not type(self).supports_multilabel:
            raise ConfigError(f"{type(self).__name__} does not support multi-label data sets")
        self.multilabel = multilabel
        self.multilabel_cfg = cfg or MultiLabelConfig()

    # ---- binding ---------------------------------------------------------------------
    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        object.__setattr__(self, "_clip", clip)
        self.classnames = list(classnames)

    @property
    def clip(self) -> FrozenCLIP:
        if self._clip is None:
            raise RuntimeError(f"{type(self).__name__}.setup() was not called")
        return self._clip

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def set_classes(self, classnames: list[str]) -> None:
        """Classify among `classnames` from now on (base-to-novel evaluation switches between
        the training classes and other class sets). Learners keep what they derive from a
        class set cached per set, so switching back and forth recomputes nothing."""
        if list(classnames) == self.classnames:
            return
        self.classnames = list(classnames)
        self._eval_text = None
        self._classes_changed()

    def _classes_changed(self) -> None:
        """Rebuild (or fetch from the per-set cache) whatever depends on the class names."""
        raise NotImplementedError(f"{type(self).__name__} cannot switch its classes")

    def train(self, mode: bool = True) -> PromptLearner:
        self._eval_text = None
        return super().train(mode)

    # ---- the global part -----------------------------------------------------------------
    @contextlib.contextmanager
    def global_part(self) -> Iterator[PromptLearner]:
        """Within this context the learner computes with its global part alone (see
        `global_description`); class features cached outside it are not reused inside."""
        previous = self._global
        self._global = True
        self.invalidate_cache()
        try:
            yield self
        finally:
            self._global = previous
            self.invalidate_cache()

    @property
    def using_global(self) -> bool:
        """True inside `global_part()`."""
        return self._global

    # ---- computation -----------------------------------------------------------------
    def image_features(self, batch: Batch) -> Tensor:
        """Frozen image features (B, D), normalised (unless the learner declares
        RAW_FEATURES): cached ones when the batch has them."""
        if batch.features is not None:
            return batch.features
        raw = Input.RAW_FEATURES in type(self).inputs
        with torch.no_grad():
            return self.clip.encode_image(batch.images, normalize=not raw)

    def text_features(self) -> Tensor:
        """Normalised class text features (C, D); with gradient to the prompts in training."""
        raise NotImplementedError

    def negative_text_features(self) -> Tensor:
        """Multi-label: normalised negative class features (C, D) ("no {class} here")."""
        raise NotImplementedError(f"{type(self).__name__} has no multi-label support")

    def _class_features(self) -> Tensor:
        if not self.multilabel:
            return self.text_features()
        return torch.stack([self.text_features(), self.negative_text_features()])  # (2, C, D)

    def class_text_features(self) -> Tensor:
        """text_features() (stacked with the negative features when multi-label: (2, C, D)),
        computed once per evaluation pass when not training."""
        if self.training or torch.is_grad_enabled():
            return self._class_features()
        if self._eval_text is None:
            self._eval_text = self._class_features()
        return self._eval_text

    def scores(self, f: Tensor, t: Tensor) -> Tensor:
        """Logits of image features f (B, D) against class features t: (C, D) gives
        s * f t^T + b (b: the logit bias of sigmoid-trained models such as SigLIP, else 0);
        multi-label (2, C, D) gives s * (f t+^T - f t-^T), where b cancels."""
        s = self.clip.logit_scale
        f = f.to(t.dtype)
        if t.dim() == 3:
            return s * (f @ t[0].t() - f @ t[1].t())  # (B, C)
        return s * f @ t.t() + self.clip.logit_bias.to(f.dtype)  # (B, C)

    def forward(self, batch: Batch) -> Tensor:
        f = self.image_features(batch)  # (B, D)
        return self.scores(f, self.class_text_features())

    # ---- inference on images ------------------------------------------------------------
    def inference_batch(self, images: Tensor | Sequence[Any]) -> Batch:
        """A Batch of `images` holding what this learner's `inputs` declare, computed as the
        data layer computes them: pooled features (FEATURES), dense tokens through float16
        as they are cached (TOKENS), the images themselves (IMAGES), the image's and its
        flip's features (FLIP_TARGETS). Labels and sample ids are placeholders (zeros,
        0..B-1): nothing at inference reads them.

        images: a (B, 3, H, W) or (3, H, W) tensor already preprocessed with the backbone's
        evaluation transform (`clip.preprocess_val`), or a list of PIL images, which are
        preprocessed here with that transform."""
        clip = self.clip
        if not isinstance(images, Tensor):
            images = torch.stack([clip.preprocess_val(image) for image in images])
        if images.dim() == 3:
            images = images.unsqueeze(0)
        images = images.to(clip.device)
        n, inputs = images.shape[0], type(self).inputs
        with torch.no_grad():
            raw = Input.RAW_FEATURES in inputs
            features = None
            if Input.FEATURES in inputs or raw:
                features = clip.encode_image(images, normalize=not raw).float()
            tokens = None
            if Input.TOKENS in inputs:
                tokens = clip.encode_dense(images).to(torch.float16).float()
            targets = None
            if Input.FLIP_TARGETS in inputs:
                plain, flipped = clip.encode_image(images), clip.encode_image(images.flip(-1))
                targets = torch.stack([plain, flipped], dim=1).float()
        if self.multilabel:
            labels = torch.zeros(n, self.num_classes, device=images.device)
        else:
            labels = torch.zeros(n, dtype=torch.long, device=images.device)
        return Batch(
            labels=labels,
            index=torch.arange(n, device=images.device),
            images=images if Input.IMAGES in inputs else None,
            features=features,
            targets=targets,
            tokens=tokens,
        )

    @torch.no_grad()
    def predict_logits(self, images: Tensor | Sequence[Any]) -> Tensor:
        """Logits (B, C) of `images` (see `inference_batch`) against the current classes
        (`classnames`), in eval mode: what evaluation computes for the same images."""
        was_training = self.training
        self.eval()
        try:
            return self(self.inference_batch(images)).float()
        finally:
            if was_training:
                self.train(True)

    def predict(self, images: Tensor | Sequence[Any]) -> Tensor:
        """Class probabilities (B, C) of `images`: a softmax over `classnames`; for a
        multi-label task, each class's own sigmoid (they need not sum to 1).

        images: a (B, 3, H, W) tensor preprocessed with the backbone's evaluation transform
        (`learner.clip.preprocess_val`), or a list of PIL images (preprocessed here). No
        Batch, labels or sample ids are needed; whatever the learner's `inputs` declare is
        computed from the images (`inference_batch`). `predict_logits` gives the logits."""
        logits = self.predict_logits(images)
        return torch.sigmoid(logits) if self.multilabel else logits.softmax(-1)

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        if not self.multilabel:
            return F.cross_entropy(logits.float(), batch.labels)
        cfg = self.multilabel_cfg
        targets = batch.labels.float()
        if cfg.loss == "bce":
            return (
                F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
                .sum(-1)
                .mean()
            )
        return asymmetric_loss(logits.float(), targets, cfg.gamma_pos, cfg.gamma_neg, cfg.clip)

    def training_loss(self, batch: Batch) -> Tensor:
        """The loss of one training step; learners with extra terms override it."""
        return self.loss(self(batch), batch)

    def end_of_round(self, mean_loss: float) -> bool:
        """Called after the client's local training of a round with its mean loss; returns
        True when the set of trainable parameters changed (the client then builds new
        optimizers)."""
        return False

    def invalidate_cache(self) -> None:
        """Forget the class features computed from the current prompts (call it after
        changing tensors from outside)."""
        self._eval_text = None

    def initial_state(self) -> str:
        """What the model evaluated at round 0 (before any training) is, in a few words for
        the round-0 line and summary.json, e.g. "zero-shot, 'a photo of a {class}'" or
        "random prompts (not zero-shot)". Read from the config alone (no set-up needed)."""
        return "the initial prompts"

    def report(self) -> dict[str, Any]:
        """The learner's own values after a round (e.g. a phase, a cost, the ids of the
        experts it holds): numbers are logged as `client/K/NAME` for the round, lists of
        ints are shown in the summary's client rows. Default: none."""
        return {}

    # ---- the reference path (benchmarks) ----------------------------------------------
    def reference_loss(self, images: Tensor, batch: Batch) -> Tensor | None:
        """This learner's training loss computed the reference way, from raw `images`, with
        none of fedclip's fast paths (the image encoder at every step, full-length prompts,
        nothing cached); `make bench` times it against `training_loss` and checks that
        `reference_logits` equals `forward`. None: the learner has no fast path."""
        logits = self.reference_logits(images)
        return None if logits is None else self.loss(logits, batch)

    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The logits of `reference_loss` (None: no fast path)."""
        return None

    def example_extras(self, n: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A plausible download of `n` extras (e.g. n experts), for tests and benchmarks
        that run the learner without a strategy. Default: none."""
        return {}

    # ---- what travels ------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        """Names (as in state_dict) of the tensors that are uploaded now. Every learner
        declares them; there is no default."""
        raise ContractError(
            f"{type(self).__name__} must declare what it uploads: override shared_keys()"
        )

    def personal_keys(self) -> list[str]:
        """Names of the trainable parameters that never leave the client (default: none)."""
        return []

    def expected_extra_state(self, reference: dict[str, Any], saved: Any) -> Any:
        """What a checkpoint's `_extra_state` (`saved`) must look like, given a fresh
        learner's state dict `reference` (checkpoint validation): by default the fresh
        extra state itself; a learner whose extra state grows overrides this."""
        return reference["_extra_state"]

    def upload_schema(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every tensor this learner may ever upload (all its
        parameters: a learner may switch which of them it shares)."""
        return {n: (tuple(p.shape), p.dtype) for n, p in self.named_parameters()}

    def shared_state(self) -> dict[str, Tensor]:
        sd = self.state_dict()
        return {k: sd[k].detach().clone() for k in self.shared_keys()}

    @torch.no_grad()
    def load_shared_state(self, state: dict[str, Tensor]) -> None:
        """Load downloaded tensors. Every key must be one this learner shares now; shared
        keys the download lacks (nobody has uploaded them yet) keep their values."""
        keys = set(self.shared_keys())
        if not set(state) <= keys:
            raise ValueError(
                f"{type(self).__name__}: downloaded keys {sorted(set(state) - keys)} are not "
                f"among the shared keys {sorted(keys)}"
            )
        own = self.state_dict()
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(
                    f"shared tensor {k}: shape {tuple(v.shape)} != {tuple(own[k].shape)}"
                )
            own[k].copy_(v)
        self._eval_text = None

    def receive(self, extras: dict[str, Any]) -> None:
        if extras:
            raise ValueError(
                f"{type(self).__name__} takes no extra downloads, got {sorted(extras)}"
            )

    # ---- optimisation ------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def has_trainable(self) -> bool:
        return any(True for _ in self.trainable_parameters())

    def configure_optimizers(
        self, optim: OptimConfig, steps_per_round: int, rounds: int
    ) -> list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]:
        """One (optimizer, per-step scheduler) pair per parameter group that has its own
        optimiser. The default trains every trainable parameter with `optim`."""
        return [optimizer_for(list(self.trainable_parameters()), optim, steps_per_round, rounds)]


def check_contract(learner: PromptLearner) -> None:
    """Raise ContractError when the learner's declarations do not cover its trainables:
    every trainable parameter must be shared or personal, never both, and every shared key
    must name a tensor of its state."""
    name = type(learner).__name__
    shared, personal = set(learner.shared_keys()), set(learner.personal_keys())
    both = sorted(shared & personal)
    if both:
        raise ContractError(f"{name}: {both} declared both shared and personal")
    state = learner.state_dict()
    unknown = sorted(shared - set(state))
    if unknown:
        raise ContractError(f"{name}: shared keys {unknown} are not in its state_dict")
    trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
    undeclared = sorted(trainable - shared - personal)
    if undeclared:
        raise ContractError(
            f"{name}: trainable {undeclared} are neither in shared_keys() nor in "
            "personal_keys(); declare where each goes"
        )


def make_learner(
    template: PromptLearner,
    clip: FrozenCLIP,
    classnames: list[str],
    seed: int,
    multilabel: bool = False,
    multilabel_cfg: MultiLabelConfig | None = None,
    device: torch.device | str | None = None,
    client_id: int | None = None,
) -> PromptLearner:
    """The one factory of learners: a copy of the config's `template` (never set up
    itself), set to the task, set up on `clip` and `classnames` for client `client_id`,
    its contract checked, on `device` (default: the backbone's)."""
    learner = copy.deepcopy(template)
    learner.client_id = client_id
    learner.set_task(multilabel, multilabel_cfg)
    learner.setup(clip, classnames, seed)
    check_contract(learner)
    return learner.to(device if device is not None else clip.device)
