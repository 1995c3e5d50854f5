"""Spec validation in-process (fast): every float field finite and in range, size limits,
"did you mean" hints, every fault reported at once, control value ranges."""
from __future__ import annotations

import math

import pytest

from tests.conftest import digits_spec
from trainctl.spec import Spec, SpecError, check_control_value, parse_spec
from trainctl.spec_checks import MAX_DEPTH, MAX_ITEMS, MAX_STRING, _models_in, _tag

# Minimal valid sections for the variants that have required fields.
REQUIRED = {"cosine_restarts": {"T_0": 1}, "exponential": {"gamma": 0.9}, "gradual_warmup": {"total_epoch": 1},
            "multistep": {"milestones": [1]}, "step": {"step_size": 1}}


def _float_fields(cls=Spec, prefix="", variant=None, depth=0):
    """(dotted path, tagged-union variant) of every float-typed field a spec can hold,
    found by walking the declared models (so a new field is covered without editing this)."""
    for name, f in cls.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if "float" in str(f.annotation):
            yield path, variant
        models = _models_in(f.annotation)
        if depth < 1 or (models and len(models) == 1):
            for m in models:
                if name != "after":
                    yield from _float_fields(m, path, _tag(m) if len(models) > 1 else variant, depth + 1)


FLOAT_FIELDS = sorted(set(_float_fields()))


def _spec_with(path: str, variant: str | None, value):
    spec = digits_spec("floats")
    section, *rest = path.split(".")
    if section == "schedule":
        spec["schedule"] = {"name": variant, **REQUIRED.get(variant, {})}
    elif section == "loss":
        spec["loss"] = {"name": variant}
    elif section == "control":
        spec["control"] = [{"at_step": 1}]
    target = spec[section] if section != "control" else spec["control"][0]
    for key in rest[:-1]:
        target = target.setdefault(key, {})
    leaf = rest[-1] if rest else section
    annotation = str(_annotation(path, variant))
    target[leaf] = [value, value] if ("tuple" in annotation or "list" in annotation.lower()) else value
    return spec


def _annotation(path, variant):
    cls = Spec
    parts = path.split(".")
    for i, name in enumerate(parts):
        f = cls.model_fields[name]
        if i == len(parts) - 1:
            return f.annotation
        models = _models_in(f.annotation)
        cls = models[0] if len(models) == 1 else next(m for m in models if _tag(m) == variant)


def test_the_walk_finds_the_fields_the_issue_names():
    paths = {p for p, _ in FLOAT_FIELDS}
    assert {"schedule.warmup_epochs", "schedule.warmup_lr", "schedule.min_lr", "train.mixup.mixup_alpha",
            "train.clip_grad", "optimizer.lr", "loss.s", "control.scale_lr"} <= paths
    assert len(FLOAT_FIELDS) > 60


@pytest.mark.parametrize("path, variant", FLOAT_FIELDS, ids=[f"{p}[{v}]" if v else p for p, v in FLOAT_FIELDS])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e300])
def test_every_float_field_refuses_non_finite_and_absurd_values(path, variant, value):
    spec = _spec_with(path, variant, value)
    with pytest.raises(SpecError) as info:
        parse_spec(spec, check_model=False)
    shown = path if not path.startswith("control.") else path.replace("control.", "control.0.")
    leaf = path.rsplit(".", 1)[-1]
    # The field's own path, or its section's validator naming it ("schedule: lb must be < ub").
    assert any(line.startswith(shown) or (line.startswith(path.split(".")[0]) and leaf in line)
               for line in info.value.errors), (path, info.value.errors)


def test_valid_values_still_pass():
    parse_spec(_spec_with("schedule.warmup_lr", "cosine", 0.01), check_model=False)
    parse_spec(_spec_with("loss.s", "ldam", 30.0), check_model=False)
    parse_spec(_spec_with("schedule.final_div_factor", "onecycle", 1e4), check_model=False)


def test_ranges_named_in_the_message():
    errs = _errors(lambda s: s["schedule"].update(warmup_lr=1e9, min_lr=500.0, warmup_epochs=1e7))
    assert "schedule.warmup_lr: must be <= 100 (a learning rate), got 1e+09" in errs
    assert "schedule.min_lr: must be <= 100 (a learning rate), got 500" in errs
    assert "schedule.warmup_epochs: must be within +-1e+06, got 1e+07" in errs


def test_integers_beyond_a_double_are_refused():
    errs = _errors(lambda s: s.update(control=[{"at_step": 10 ** 30, "set_lr": 0.1}]))
    assert any(e.startswith("control.0.at_step: must be within +-2**53") for e in errs), errs


def _errors(mutate) -> list[str]:
    spec = digits_spec("x")
    mutate(spec)
    with pytest.raises(SpecError) as info:
        parse_spec(spec, check_model=False)
    return info.value.errors


# ---------------------------------------------------------------- size limits

def test_long_string_names_field_and_limit():
    errs = _errors(lambda s: s["data"].update(path="p" * 5000))
    assert f"data.path: a string of 5,000 characters; the limit is {MAX_STRING:,}" in errs


def test_deep_nesting_and_wide_containers_are_refused():
    deep: dict = {}
    cur = deep
    for _ in range(MAX_DEPTH + 5):
        cur["k"] = {}
        cur = cur["k"]
    errs = _errors(lambda s: s["model"].update(kwargs=deep))
    assert any(e.startswith("model.kwargs.k") and "nested more than" in e for e in errs), errs
    errs = _errors(lambda s: s["model"].update(kwargs={"xs": list(range(MAX_ITEMS + 1))}))
    assert f"model.kwargs.xs: {MAX_ITEMS + 1:,} entries; the limit is {MAX_ITEMS:,}" in errs


def test_huge_spec_is_refused_without_validating_it():
    errs = _errors(lambda s: s["model"].update(kwargs={f"k{i}": "v" * 4000 for i in range(400)}))
    assert errs == ["spec: more than 1,048,576 bytes; the limit is 1,048,576 (1 MiB)"]


# ---------------------------------------------------------------- hints, all faults at once

@pytest.mark.parametrize("mutate, line", [
    (lambda s: s.update(epochs=5), "epochs: unknown key; did you mean train.epochs?"),
    (lambda s: s["train"].update(seeed=1), "train.seeed: unknown key; did you mean train.seed?"),
    (lambda s: s["data"].update(batchsize=8), "data.batchsize: unknown key; did you mean data.batch_size?"),
    (lambda s: s["train"].update(lr=0.1), "train.lr: unknown key; did you mean optimizer.lr?"),
    (lambda s: s.update(schedule={"name": "step", "step_size": 1, "gama": 0.5}),
     "schedule.gama: unknown key; did you mean schedule.gamma?"),
    (lambda s: s.update(schedule={"name": "gradual_warmup", "total_epoch": 1,
                                  "after": {"name": "step", "step_size": 1, "gama": 0.5}}),
     "schedule.after.gama: unknown key; did you mean schedule.after.gamma?"),
    (lambda s: s["schedule"].update(name="cosin"), "did you mean 'cosine'?"),
])
def test_misspelled_keys_get_a_suggestion(mutate, line):
    errs = _errors(mutate)
    assert any(line in e for e in errs), errs


def test_no_wrong_suggestion_for_a_key_the_variant_lacks():
    errs = _errors(lambda s: s["schedule"].update(gama=0.5))  # cosine has no gamma
    assert errs == ["schedule.gama: unknown key"], errs


def test_every_fault_is_reported_at_once_with_the_unknown_model():
    spec = digits_spec("many")
    spec["model"]["name"] = "resnet_does_not_exist"
    spec["colour"] = "blue"
    spec["optimizer"]["lr"] = -1
    spec["schedule"]["warmup_epochs"] = math.inf
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    errs = info.value.errors
    assert len(errs) == 4, errs
    assert any(e.startswith("model.name: unknown timm model 'resnet_does_not_exist'") for e in errs)
    assert "colour: unknown key" in errs and "optimizer.lr: must be > 0, got -1" in errs
    assert "schedule.warmup_epochs: must be a finite number, got inf" in errs


def test_a_nan_is_reported_once():
    errs = _errors(lambda s: s.update(control=[{"at_step": 5, "set_lr": math.nan}]))
    assert errs == ["control.0.set_lr: must be a finite number, got nan"]


# ---------------------------------------------------------------- control values

@pytest.mark.parametrize("verb, value, message", [
    ("scale_lr", 1e308, "scale_lr must be in (0, 1000], got 1e+308"),
    ("scale_lr", math.inf, "scale_lr must be a finite number, got inf"),
    ("set_lr", 1e3, "set_lr must be in (0, 100], got 1000"),
    ("set_lr", 0.0, "set_lr must be in (0, 100], got 0"),
    ("set_lr_decay", 1.5, "set_lr_decay must be in (0, 1], got 1.5"),
    ("set_ema_decay", math.nan, "set_ema_decay must be a finite number, got nan"),
    ("set_weight_decay", -0.1, "set_weight_decay must be in [0, 1], got -0.1"),
])
def test_control_values_have_stated_ranges(verb, value, message):
    with pytest.raises(ValueError) as info:
        check_control_value(verb, value)
    assert str(info.value) == message


@pytest.mark.parametrize("verb, value", [("scale_lr", 1000.0), ("scale_lr", 1e-9), ("set_lr", 100.0),
                                         ("set_weight_decay", 0.0), ("set_ema_decay", 1.0)])
def test_control_values_in_range_pass(verb, value):
    check_control_value(verb, value)
