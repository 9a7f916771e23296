"""Checks of the sentence templates a learner fills with class names (and attributes).

A template is a Python format string. `check_template` refuses, at config time and in one
line, what `str.format` would only refuse on the first batch (or never, filling in the wrong
text): an unbalanced brace, a placeholder that is not one of the allowed names, a positional
`{0}` where names are expected, a missing required placeholder.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from fedclip.errors import ConfigError

POSITIONAL = ""  # the name of the '{}' placeholder


def _show(names: Sequence[str]) -> str:
    return ", ".join("{}" if n == POSITIONAL else "{" + n + "}" for n in names)


def check_template(
    owner: str, arg: str, template: object, allowed: Sequence[str], required: Sequence[str] = ()
) -> None:
    """ConfigError naming `owner: arg` unless `template` is a format string whose only
    placeholders are `allowed` names ('' for '{}'), holding every `required` one. Literal
    braces are written doubled ('{{', '}}'), as in str.format."""
    where = f"{owner}: {arg} {template!r}"
    if not isinstance(template, str):
        raise ConfigError(f"{owner}: {arg} must be a string, got {type(template).__name__}")
    try:
        fields = [
            (name, conv, spec)
            for _, name, spec, conv in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as e:  # "Single '}' encountered ...", "expected '}' before end ..."
        raise ConfigError(
            f"{where} is not a valid template ({e}; write a literal brace as '{{{{' or '}}}}')"
        ) from None
    for name, conv, spec in fields:
        if name not in allowed:
            shown = "{}" if name == POSITIONAL else "{" + name + "}"
            positional = name.isdigit() or name == POSITIONAL
            hint = " (positional)" if positional and POSITIONAL not in allowed else ""
            raise ConfigError(
                f"{where} has the placeholder {shown}{hint}; it may use only {_show(allowed)}"
            )
        if conv or spec:
            raise ConfigError(f"{where}: placeholder {{{name}}} takes no conversion or format spec")
    missing = [n for n in required if n not in {f[0] for f in fields}]
    if missing:
        raise ConfigError(f"{where} needs the placeholder {_show(missing)}")


def check_templates(
    owner: str, arg: str, templates: object, allowed: Sequence[str], required: Sequence[str] = ()
) -> None:
    """check_template for each of a list of templates, naming `arg[i]`."""
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise ConfigError(f"{owner}: {arg} must be a list of strings, got {templates!r}")
    if not templates:
        raise ConfigError(f"{owner}: {arg} must hold at least one template")
    for i, template in enumerate(templates):
        check_template(owner, f"{arg}[{i}]", template, allowed, required)


# The prompt ensemble of CLIP's ImageNet evaluation (Radford et al., ICML 2021, the
# "Prompt_Engineering_for_ImageNet" notebook), 60 sentences: PromptSRC averages their frozen
# text features per class as its zero-shot text targets. Data: one '{}' per sentence.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(
    "a photo of a {}.|a bad photo of a {}.|a photo of many {}.|a sculpture of a {}.|"
    "a photo of the hard to see {}.|a low resolution photo of the {}.|a rendering of a {}.|"
    "graffiti of a {}.|a bad photo of the {}.|a cropped photo of the {}.|a tattoo of a {}.|"
    "the embroidered {}.|a photo of a hard to see {}.|a bright photo of a {}.|"
    "a photo of a clean {}.|a photo of a dirty {}.|a dark photo of the {}.|"
    "a drawing of a {}.|a photo of my {}.|the plastic {}.|a photo of the cool {}.|"
    "a close-up photo of a {}.|a black and white photo of the {}.|a painting of the {}.|"
    "a painting of a {}.|a pixelated photo of the {}.|a sculpture of the {}.|"
    "a bright photo of the {}.|a cropped photo of a {}.|a plastic {}.|"
    "a photo of the dirty {}.|a jpeg corrupted photo of a {}.|a blurry photo of the {}.|"
    "a photo of the {}.|a good photo of the {}.|a rendering of the {}.|"
    "a {} in a video game.|a photo of one {}.|a doodle of a {}.|"
    "a close-up photo of the {}.|the origami {}.|the {} in a video game.|"
    "a sketch of a {}.|a doodle of the {}.|a origami {}.|a low resolution photo of a {}.|"
    "the toy {}.|a rendition of the {}.|a photo of the clean {}.|a photo of a large {}.|"
    "a rendition of a {}.|a photo of a nice {}.|a photo of a weird {}.|"
    "a blurry photo of a {}.|a cartoon {}.|art of a {}.|a sketch of the {}.|"
    "a embroidered {}.|a pixelated photo of a {}.|itap of the {}.".split("|")
)
