"""FedCLIP: an attention adapter on the frozen image feature; the text side stays frozen.

Lu, Hu, Wang, Xie, "FedCLIP: Fast Generalization and Personalization for CLIP in Federated
Learning" (arXiv 2302.13485, 2023). No prompt is learned: an adapter

    A = Linear(D, D) -> Tanh -> Linear(D, D) -> Softmax (over the D coordinates)

re-weights each coordinate of the frozen image feature e, f = normalise(A(e) * e), and
images are classified by s * f @ t^T against the frozen text features t of a hand-written
sentence ("a picture of a {}", the reference's), encoded once per class set. The image
features are the data layer's cached ones when augmentation is off (computed per batch
when it is on): the backbone never runs in training mode (FrozenCLIP.train keeps it in
eval mode, so BatchNorm statistics of RN towers never move).

e is the unnormalised frozen feature, as in the reference (the learner declares
Input.RAW_FEATURES: the data layer caches the features before their normalisation). The
final normalisation removes e's scale from A(e) * e, but not from the adapter's input.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedclip.backbone import FrozenCLIP
from fedclip.batch import Batch, Input
from fedclip.errors import ConfigError
from fedclip.learners.base import OptimConfig, PromptLearner, optimizer_for
from fedclip.templates import POSITIONAL, check_template

LOSSES = ("ce", "clip_contrastive", "masked_contrastive")


def attention_adapter(dim: int) -> nn.Sequential:
    """Linear(D, D) -> Tanh -> Linear(D, D) -> Softmax(-1), PyTorch's default init."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Softmax(dim=-1))


def in_batch_contrastive(logits: Tensor, labels: Tensor, masked: bool) -> Tensor:
    """CLIP's symmetric in-batch loss of logits (B, B) (image i against the class text of
    sample j): (CE(L, arange) + CE(L^T, arange)) / 2. `masked`: pairs i != j of the same
    label are left out (they are not negatives). A batch of one has no negatives: a zero
    that keeps the graph."""
    b = logits.shape[0]
    if b < 2:
        return logits.sum() * 0.0
    if masked:
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        off = same & ~torch.eye(b, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(off, float("-inf"))
    target = torch.arange(b, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class AttentionAdapter(PromptLearner):
    """FedCLIP's attention adapter (about 2 (D^2 + D) parameters, 525 K for D = 512), all
    of it trained and uploaded; nothing is personal and the text side is frozen.

    Args:
        template: the sentence of the frozen class texts, '{}' for the class name.
        negative_template: multi-label only: the frozen negative sentence; the logits are
            s cos(f, t+) - s cos(f, t-).
        loss: 'ce' (cross-entropy over the C class texts, what evaluation scores), or the
            reference's in-batch CLIP loss 'clip_contrastive' (two images of one class are
            negatives of each other), or 'masked_contrastive' (such pairs left out);
            single-label only.
        optimizer: 'adam' (the reference: Adam with the settings below, constant LR) or
            'run' (the run's `optim:` SGD and schedule).
        lr, betas, eps, weight_decay: the Adam settings (weight decay as Adam's L2 term).
        fresh_optimizer: a new Adam at every round the client trains (the reference);
            false keeps its moments across rounds. Only with optimizer 'adam'.
    """

    inputs = frozenset({Input.RAW_FEATURES})  # the adapter reads the feature's scale too

    def __init__(
        self,
        template: str = "a picture of a {}",
        negative_template: str = "a picture without a {}",
        loss: Literal["ce", "clip_contrastive", "masked_contrastive"] = "ce",
        optimizer: Literal["adam", "run"] = "adam",
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.2,
        fresh_optimizer: bool = True,
    ) -> None:
        super().__init__()
        for arg, value in (("template", template), ("negative_template", negative_template)):
            check_template("AttentionAdapter", arg, value, [POSITIONAL], [POSITIONAL])
        if loss not in LOSSES:
            raise ConfigError(
                f"learner.init_args.loss={loss!r}: must be one of {', '.join(LOSSES)}"
            )
        if optimizer not in {"adam", "run"}:
            raise ConfigError(f"learner.init_args.optimizer={optimizer!r}: must be adam or run")
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learner.init_args.lr={lr}: must be > 0 and finite")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"learner.init_args.betas={betas}: two values in [0, 1)")
        if not (eps > 0 and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ConfigError(
                f"learner.init_args.eps={eps}, weight_decay={weight_decay}: eps must be > 0 "
                "and weight_decay >= 0"
            )
        self.template = template
        self.negative_template = negative_template
        self.loss_kind = loss
        self.optimizer = optimizer
        self.lr, self.betas, self.eps, self.weight_decay = (
            float(lr),
            betas,
            float(eps),
            weight_decay,
        )
        self.fresh_optimizer = bool(fresh_optimizer)
        self._texts: dict[tuple[str, ...], Tensor] = {}

    def set_task(self, multilabel, cfg=None) -> None:
        if multilabel and self.loss_kind != "ce":
            raise ConfigError(
                f"learner.init_args.loss={self.loss_kind}: the in-batch loss needs single-label "
                "data; use loss: ce for multi-label data sets"
            )
        super().set_task(multilabel, cfg)

    def setup(self, clip: FrozenCLIP, classnames: list[str], seed: int) -> None:
        super().setup(clip, classnames, seed)
        with torch.random.fork_rng(devices=[]):  # the same init on every client
            torch.manual_seed(seed)
            adapter = attention_adapter(clip.embed_dim)
        self.adapter = adapter.to(clip.device)
        self._texts = {}

    def _classes_changed(self) -> None:
        pass  # frozen text features are looked up per class set

    # ---- frozen text side ----------------------------------------------------------------
    @torch.no_grad()
    def _template_features(self, template: str) -> Tensor:
        key = (template, *self.classnames)
        if key not in self._texts:
            names = [c.replace("_", " ") for c in self.classnames]
            feats = self.clip.encode_text([template.format(n) for n in names]).float()
            self._texts[key] = feats / feats.norm(dim=-1, keepdim=True)
        return self._texts[key]

    def text_features(self) -> Tensor:
        return self._template_features(self.template)

    def negative_text_features(self) -> Tensor:
        return self._template_features(self.negative_template)

    # ---- computation ---------------------------------------------------------------------
    def adapt(self, e: Tensor) -> Tensor:
        """f = normalise(A(e) * e) of frozen image features e (B, D), in fp32."""
        e = e.float()
        return F.normalize(self.adapter(e) * e, dim=-1)

    def forward(self, batch: Batch) -> Tensor:
        return self.scores(self.adapt(self.image_features(batch)), self.class_text_features())

    def training_loss(self, batch: Batch) -> Tensor:
        if self.loss_kind == "ce":
            return self.loss(self(batch), batch)
        f = self.adapt(self.image_features(batch))  # (B, D)
        t = self.text_features()[batch.labels]  # (B, D): each sample's own class text
        logits = self.clip.logit_scale * f @ t.t()  # (B, B)
        return in_batch_contrastive(logits, batch.labels, self.loss_kind == "masked_contrastive")

    def reference_logits(self, images: Tensor) -> Tensor | None:
        """The reference way: the image encoder and every class's full-length sentence
        through the text tower at every step."""
        if self.multilabel:
            return None
        with torch.no_grad():
            e = self.clip.encode_image(images, normalize=False)  # the raw feature
            names = [c.replace("_", " ") for c in self.classnames]
            tokens = self.clip.tokenize([self.template.format(n) for n in names])
            t = self.clip.encode_prompted_text(
                self.clip.token_embedding(tokens), tokens, truncate=False
            ).float()
        return self.scores(self.adapt(e), t)

    def initial_state(self) -> str:
        shown = self.template.replace("{}", "{class}")
        return f"near zero-shot, '{shown}' (a random adapter: about uniform weights)"

    # ---- what travels --------------------------------------------------------------------
    def shared_keys(self) -> list[str]:
        """The whole adapter."""
        return [f"adapter.{n}" for n, _ in self.adapter.named_parameters()]

    # ---- optimisation --------------------------------------------------------------------
    def configure_optimizers(
        self, optim: OptimConfig, steps_per_round: int, rounds: int
    ) -> list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]:
        params = list(self.adapter.parameters())
        if self.optimizer == "run":
            return [optimizer_for(params, optim, steps_per_round, rounds)]
        opt = torch.optim.Adam(
            params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )
        return [(opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))]

    def end_of_round(self, mean_loss: float) -> bool:
        """True (the client builds a new optimizer) when every round starts a fresh Adam."""
        return self.optimizer == "adam" and self.fresh_optimizer
