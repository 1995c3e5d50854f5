"""Models: spec section `model:` -> a timm nn.Module, built offline.

Importing this module does not import torch or timm (`import timm` pulls in torch, so
`build_model` imports both on first use); the name checks the server also needs live in
`trainctl.params.model_names`.
"""
from __future__ import annotations

import os
from typing import List, Optional

from trainctl.params.model_data import ModelParams
from trainctl.params.model_names import known_model, suggest_models  # noqa: F401 (re-exported)


class ModelError(ValueError):
    """A model spec that cannot be built here (unknown name, missing weights file...)."""


def check_model(params: ModelParams) -> None:
    """The checks that need no weights file: raise ModelError or return."""
    if params.pretrained and not params.weights:
        raise ModelError("model.pretrained: true needs model.weights (a local file); "
                         "trainctl never downloads weights")
    if not known_model(params.name):
        close = suggest_models(params.name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"model.name: unknown timm model {params.name!r}{hint}")


def build_model(params: ModelParams, *, num_classes: int, in_chans: int,
                loss_name: Optional[str] = None):
    """num_classes / in_chans come from the DataBundle; the spec's own values, when set,
    must agree. loss_name "ldam" swaps the head for a cosine classifier. Returns the
    model on CPU in train mode."""
    import timm

    check_model(params)
    for field, spec_value, data_value in (("num_classes", params.num_classes, num_classes),
                                          ("in_chans", params.in_chans, in_chans)):
        if spec_value is not None and spec_value != data_value:
            raise ModelError(f"model.{field}: {spec_value}, but the dataset has {data_value}")
    if params.weights and not os.path.isfile(params.weights):
        # Checked before building so a typo fails fast, not after a big model is allocated.
        raise ModelError(f"model.weights: {params.weights} does not exist on this worker")
    try:
        model = timm.create_model(params.name, pretrained=False, num_classes=num_classes,
                                  in_chans=in_chans, drop_rate=params.drop_rate,
                                  **params.kwargs)
    except TypeError as e:  # a kwarg the architecture does not take
        raise ModelError(f"model.kwargs: {params.name}: {e}") from None
    if loss_name == "ldam":
        use_cosine_head(model)
    if params.weights:
        load_weights(model, params.weights)
    return model


def _classifier_names(model) -> List[str]:
    """Dotted names of the classifier module(s). timm's get_classifier() returns the module
    (a tuple for distilled ViTs); we need names to swap modules, so match by identity."""
    heads = model.get_classifier()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(h) for h in heads}
    return [name for name, m in model.named_modules() if id(m) in ids and name]


def use_cosine_head(model) -> None:
    """Replace the Linear classifier(s) with NormedLinear, as LDAM expects.

    timm's reset_classifier() can only build a new nn.Linear (and each architecture builds
    it differently: fc, head, head.fc, classifier), so we keep timm's choice of *where*
    the head is (get_classifier) and swap the module found there."""
    from torch import nn
    from .losses.ldam import NormedLinear

    names = _classifier_names(model)
    if not names:
        raise ModelError("loss.name: ldam needs a classifier head; the model has none")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise ModelError(f"loss.name: ldam needs a Linear classifier head; "
                             f"{type(model).__name__}.{name} is {type(old).__name__}")
        setattr(parent, attr, NormedLinear(old.in_features, old.out_features)
                .to(old.weight.device, old.weight.dtype))


def load_weights(model, path: str) -> None:
    """Load a local state_dict (or a checkpoint dict holding one) into `model`.

    A classifier whose shape differs (other class count) is left freshly initialised, as
    timm does for pretrained weights, so ImageNet weights fine-tune to 10 classes; a
    first conv trained on 3 channels is adapted to in_chans with timm's adapt_input_conv.
    Any other missing, unexpected or mis-shaped key is an error: a silently half-loaded
    model trains, but not from the weights the user asked for."""
    import torch
    from timm.models import adapt_input_conv

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    except Exception as e:  # noqa: BLE001 - any load failure is the same user error
        raise ModelError(f"model.weights: cannot load {path}: {e}") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ModelError(f"model.weights: {path} holds no state_dict")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}

    own = model.state_dict()
    heads = tuple(f"{n}." for n in _classifier_names(model))
    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    first_convs = first_conv if isinstance(first_conv, (tuple, list)) else (first_conv,)
    for conv in filter(None, first_convs):
        key = f"{conv}.weight"
        if key in sd and key in own and sd[key].shape[1] != own[key].shape[1]:
            sd[key] = adapt_input_conv(own[key].shape[1], sd[key], sd[key].shape[1])
    skipped = [k for k in sd if k.startswith(heads) and
               (k not in own or sd[k].shape != own[k].shape)]
    for k in skipped:
        del sd[k]
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        raise ModelError(f"model.weights: shape mismatch in {path} for "
                         + ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                     for k in bad[:5]))
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not (skipped and k.startswith(heads))]
    if missing or result.unexpected_keys:
        raise ModelError(f"model.weights: {path} does not match {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
