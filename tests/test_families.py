"""Every open_clip family, built small (random weights, offline), with every learner.

The expected support matrix below is what the README's family x learner table shows;
`test_readme_table_matches` keeps the two the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedclip.backbone import BackboneConfig, BackboneError, load_backbone
from fedclip.backbone.families import FAMILIES, Family
from fedclip.batch import Input
from fedclip.learners import Batch, TextualPrompt
from fedclip.methods import get_method, list_methods

NAMES = ["red circle", "blue square", "green triangle"]  # Shapes classes (attribute files)


def _learners() -> dict:
    """One column per learner class of the registry, named with the methods using it."""
    by_class: dict[str, list[str]] = {}
    for name in list_methods():
        by_class.setdefault(get_method(name).learner, []).append(name)
    return {
        f"{path.rpartition('.')[2]} ({', '.join(names)})": (
            lambda m=names[0]: get_method(m).build(tiny=True)[0]
        )
        for path, names in by_class.items()
    }


LEARNERS = _learners()
NO_TOKENS = {"fedclip-tiny-rn", "fedclip-tiny-mobileclip-s"}  # convolutional vision towers
# text towers where cutting prompts after the end token is exact (causal, EOT pooling)
EXACT_CUT = {
    "fedclip-tiny-vit",
    "fedclip-tiny-rn",
    "fedclip-tiny-eva02",
    "fedclip-tiny-pecore",
    "fedclip-tiny-mobileclip-b",
}


def supported(family: Family, learner: str) -> bool:
    """Learners that change the image path or read dense tokens need a token tower (the
    ResNet's attention pool gives dense tokens too)."""
    inputs = type(LEARNERS[learner]()).inputs
    if Input.TOKENS in inputs:
        return family.tiny != "fedclip-tiny-mobileclip-s"
    return not (Input.IMAGES in inputs and family.tiny in NO_TOKENS)


def backbone(family: Family):
    return load_backbone(BackboneConfig(model=family.tiny))


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.tiny)
def test_phrase_context_equals_encode_text(family):
    """A context initialised from "a photo of a" gives the features of the sentences
    "a photo of a {class}." on every family, through whichever path the tower allows."""
    clip = backbone(family)
    assert clip.text.truncatable == (family.tiny in EXACT_CUT)
    want = clip.encode_text([f"a photo of a {name}." for name in NAMES])
    learner = TextualPrompt(ctx_init="a photo of a")
    learner.setup(clip, NAMES, seed=0)
    assert learner.n_ctx == 4
    with torch.no_grad():
        torch.testing.assert_close(learner.text_features(), want, atol=2e-6, rtol=0)
        learner.shared_prefix = False  # the batched path agrees too
        torch.testing.assert_close(learner.text_features(), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("position", ["front", "middle"])
@pytest.mark.parametrize("tiny", ["fedclip-tiny-vit", "fedclip-tiny-siglip"])
def test_context_fills_the_placeholders_wherever_the_class_goes(tiny, position):
    clip = load_backbone(BackboneConfig(model=tiny))
    learner = TextualPrompt(n_ctx=4, class_token_position=position)
    learner.setup(clip, NAMES, seed=0)
    ph = int(clip.tokenize(["X"])[0, clip.layout.offset])
    raw = clip.tokenize([f"X X X X {n}." for n in NAMES])
    for c in range(len(NAMES)):  # the same tokens, reordered; the context rows hold X's
        assert sorted(learner.tokens[c].tolist()) == sorted(
            raw[c, : learner.tokens.shape[1]].tolist()
        )
        assert (learner.tokens[c, learner.ctx_pos[c]] == ph).all()


def test_prompt_longer_than_the_context_is_refused():
    clip = load_backbone(BackboneConfig(model="fedclip-tiny-pecore"))  # 32 tokens
    with pytest.raises(ValueError, match="do not fit fedclip-tiny-pecore's 32-token context"):
        TextualPrompt(n_ctx=28).setup(clip, NAMES, seed=0)


def test_sigmoid_families_score_with_their_bias():
    clip = load_backbone(BackboneConfig(model="fedclip-tiny-siglip"))
    assert float(clip.logit_bias) == -10.0
    learner = TextualPrompt(n_ctx=4)
    learner.setup(clip, NAMES, seed=0)
    f = clip.encode_image(images(2))
    t = learner.text_features()
    want = clip.logit_scale * f @ t.t() + clip.model.logit_bias
    torch.testing.assert_close(learner.scores(f, t), want)
    plain = load_backbone(BackboneConfig(model="fedclip-tiny-vit"))
    assert float(plain.logit_bias) == 0.0


@pytest.mark.parametrize("learner_name", list(LEARNERS))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.tiny)
def test_one_training_step(family, learner_name):
    """One step of every learner on every family: gradients on the learner's trainable
    tensors only; learners a family cannot take fail with one line naming the model."""
    clip = backbone(family)
    learner = LEARNERS[learner_name]()
    if not supported(family, learner_name):
        with pytest.raises(BackboneError) as err:
            learner.setup(clip, NAMES, seed=0)
        message = str(err.value)
        why = "no dense image tokens" if Input.TOKENS in learner.inputs else "only prompt the text"
        assert family.tiny in message and "\n" not in message and why in message
        return
    learner.setup(clip, NAMES, seed=0)
    learner.receive(learner.example_extras(2, torch.Generator().manual_seed(1)))  # e.g. experts
    labels = torch.tensor([0, 1, 2, 0])
    x = images()
    inputs = type(learner).inputs
    batch = (
        Batch(labels=labels, index=torch.arange(4), images=x)
        if Input.IMAGES in inputs
        else Batch(labels=labels, index=torch.arange(4), tokens=clip.encode_dense(x))
        if Input.TOKENS in inputs
        else Batch(labels=labels, index=torch.arange(4), features=clip.encode_image(x))
    )
    learner.train()
    logits = learner(batch)
    assert logits.shape == (4, len(NAMES)) and torch.isfinite(logits).all()
    trainable = {n: p for n, p in learner.named_parameters() if p.requires_grad}
    if not trainable:
        assert not learner.shared_keys() and not learner.personal_keys()
        return
    learner.training_loss(batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in clip.model.parameters())


def render_table() -> str:
    """The README's family x learner table, from the support matrix the tests check."""
    head = "| family | e.g. | tested on | " + " | ".join(LEARNERS) + " |"
    rows = [head, "|" + "---|" * (3 + len(LEARNERS))]
    for f in FAMILIES:
        cells = ["yes" if supported(f, name) else "no (1)" for name in LEARNERS]
        rows.append(f"| {f.name} | {f.examples} | `{f.tiny}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def test_readme_table_matches():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert render_table() in readme, "README's family x learner table is out of date:\n" + (
        render_table()
    )


def test_a_missing_hugging_face_tokenizer_is_one_line(tmp_path):
    """SigLIP's real tokenizers need `transformers` (not a fedclip dependency)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("transformers is installed: the tokenizer would be fetched from the hub")
    with pytest.raises(
        BackboneError, match=r"ViT-B-16-SigLIP: its tokenizer needs the 'transformers'"
    ):
        load_backbone(BackboneConfig(model="ViT-B-16-SigLIP"))
