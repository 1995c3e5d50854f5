"""Losses against formulas written out by hand, on small tensors."""
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError

from trainctl.workers.engine.losses import (LDAMLoss, LossParams, build_loss)
from trainctl.workers.engine.losses.weights import (balanced_weights,
                                                    effective_number_weights)

LOSS = TypeAdapter(LossParams)


def make(spec, num_classes=3, class_counts=(5, 3, 2)):
    return build_loss(LOSS.validate_python(spec), num_classes=num_classes,
                      class_counts=list(class_counts))


def close(a, b, tol=1e-5):
    return abs(float(a) - float(b)) < tol


def nll(row, y):
    """-log softmax(row)[y], by hand."""
    return -(row[y] - math.log(sum(math.exp(v) for v in row)))


# ---------------------------------------------------------------- cross_entropy


def test_cross_entropy_hand_value():
    loss = make({"name": "cross_entropy"})
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    target = torch.tensor([0, 1])
    expected = (nll([2, 1, 0], 0) + nll([0, 0, 3], 1)) / 2
    assert close(loss(logits, target), expected)


def test_cross_entropy_label_smoothing_formula():
    eps = 0.1
    loss = make({"name": "cross_entropy", "label_smoothing": eps})
    row = [2.0, 1.0, 0.0]
    smooth = sum(nll(row, j) for j in range(3)) / 3
    expected = (1 - eps) * nll(row, 0) + eps * smooth
    assert close(loss(torch.tensor([row]), torch.tensor([0])), expected)


def test_balanced_weights_are_n_over_c_nj():
    w = balanced_weights([3, 1], 2)
    assert torch.allclose(w, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))


def test_cross_entropy_weighted_is_weighted_mean():
    loss = make({"name": "cross_entropy", "class_weights": [1.0, 2.0, 4.0]})
    rows, ys = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], [0, 2]
    expected = (1.0 * nll(rows[0], 0) + 4.0 * nll(rows[1], 2)) / (1.0 + 4.0)
    assert close(loss(torch.tensor(rows), torch.tensor(ys)), expected)


@pytest.mark.parametrize("spec", [
    {"name": "cross_entropy"},
    {"name": "cross_entropy", "label_smoothing": 0.2},
    {"name": "cross_entropy", "class_weights": "balanced"},
    {"name": "cross_entropy", "class_weights": [0.5, 1.0, 3.0], "label_smoothing": 0.0},
])
def test_cross_entropy_one_hot_soft_equals_hard(spec):
    loss = make(spec)
    logits = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    soft = F.one_hot(y, 3).float()
    assert torch.allclose(loss(logits, soft), loss(logits, y), atol=1e-5)


def test_cross_entropy_mixed_targets_formula():
    loss = make({"name": "cross_entropy"})
    row = [1.0, -1.0, 0.5]
    t = [0.7, 0.3, 0.0]
    expected = 0.7 * nll(row, 0) + 0.3 * nll(row, 1)
    assert close(loss(torch.tensor([row]), torch.tensor([t])), expected)


def test_soft_target_formula_and_index_targets():
    loss = make({"name": "soft_target"})
    rows = [[1.0, -1.0, 0.5], [0.0, 2.0, 0.0]]
    t = [[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]]
    expected = (0.7 * nll(rows[0], 0) + 0.3 * nll(rows[0], 1) + nll(rows[1], 2)) / 2
    assert close(loss(torch.tensor(rows), torch.tensor(t)), expected)
    assert close(loss(torch.tensor(rows), torch.tensor([0, 2])),
                 (nll(rows[0], 0) + nll(rows[1], 2)) / 2)


# ---------------------------------------------------------------- bce


def test_bce_smoothing_formula():
    loss = make({"name": "bce", "smoothing": 0.2}, num_classes=2, class_counts=(1, 1))
    x = [1.0, -1.0]
    t = [0.9, 0.1]  # on = 1 - 0.2 + 0.2/2, off = 0.2/2
    # BCE with logits: log(1 + e^x) - t x
    expected = sum(math.log1p(math.exp(xi)) - ti * xi for xi, ti in zip(x, t)) / 2
    assert close(loss(torch.tensor([x]), torch.tensor([0])), expected)


def test_bce_threshold_and_sum_classes():
    loss = make({"name": "bce", "smoothing": 0.0, "target_threshold": 0.5, "sum_classes": True},
                num_classes=2, class_counts=(1, 1))
    x = [1.0, -1.0]
    # soft target 0.6/0.4 thresholds to 1/0
    expected = (math.log1p(math.exp(1.0)) - 1.0) + math.log1p(math.exp(-1.0))
    assert close(loss(torch.tensor([x]), torch.tensor([[0.6, 0.4]])), expected)


# ---------------------------------------------------------------- focal


def test_focal_gamma_zero_is_cross_entropy():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1, 0])
    focal = make({"name": "focal", "gamma": 0.0})
    assert torch.allclose(focal(logits, y), F.cross_entropy(logits, y), atol=1e-6)


def test_focal_hand_value_with_alpha():
    loss = make({"name": "focal", "gamma": 2.0, "alpha": [0.25, 1.0, 1.0]})
    row = [2.0, 1.0, 0.0]
    p = math.exp(-nll(row, 0))
    expected = -0.25 * (1 - p) ** 2 * math.log(p)
    assert close(loss(torch.tensor([row]), torch.tensor([0])), expected)


def test_focal_confident_logits_finite_gradient():
    logits = torch.tensor([[60.0, -60.0, 0.0]], requires_grad=True)
    make({"name": "focal", "gamma": 0.5})(logits, torch.tensor([0])).backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- ldam


def test_ldam_margins_and_hand_value():
    loss = make({"name": "ldam", "max_m": 0.5, "s": 30.0}, num_classes=2, class_counts=(16, 1))
    # m_j ∝ n_j^(-1/4): 16^-1/4 = 0.5, 1^-1/4 = 1 -> scaled so max is 0.5
    assert torch.allclose(loss.margins, torch.tensor([0.25, 0.5]))
    row, y = [0.2, 0.1], 1
    shifted = [30 * 0.2, 30 * (0.1 - 0.5)]  # margin off the target logit only
    assert close(loss(torch.tensor([row]), torch.tensor([y])), nll(shifted, y), 1e-4)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_ldam_without_margin_is_cross_entropy(batch):
    g = torch.Generator().manual_seed(batch)
    loss = LDAMLoss([50, 20, 5], max_m=0.0, s=1.0)
    logits = torch.randn(batch, 3, generator=g)
    y = torch.randint(0, 3, (batch,), generator=g)
    assert torch.allclose(loss(logits, y), F.cross_entropy(logits, y), atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_ldam_any_batch_size_matches_loop(batch):
    g = torch.Generator().manual_seed(batch)
    counts = [50, 20, 5]
    loss = LDAMLoss(counts, max_m=0.5, s=10.0)
    logits = torch.randn(batch, 3, generator=g)
    y = torch.randint(0, 3, (batch,), generator=g)
    m = torch.tensor(counts, dtype=torch.float64) ** -0.25
    m = (m * 0.5 / m.max()).tolist()
    expected = sum(nll([10 * (v - (m[j] if j == int(y[i]) else 0)) for j, v in
                        enumerate(logits[i].tolist())], int(y[i]))
                   for i in range(batch)) / batch
    assert close(loss(logits, y), expected, 1e-4)


def test_ldam_drw_switches_at_drw_epoch():
    loss = make({"name": "ldam", "drw_epoch": 3, "beta": 0.9}, num_classes=2,
                class_counts=(100, 1))
    logits, y = torch.tensor([[0.3, -0.2], [0.1, 0.4]]), torch.tensor([0, 1])
    loss.set_epoch(2)
    assert loss.weight is None
    before = loss(logits, y)
    loss.set_epoch(3)
    raw = [0.1 / (1 - 0.9 ** 100), 0.1 / (1 - 0.9)]
    expected = torch.tensor([2 * r / sum(raw) for r in raw])  # normalised to sum to C = 2
    assert torch.allclose(loss.weight, expected)
    assert torch.allclose(effective_number_weights([100, 1], 2, 0.9), expected)
    assert not close(loss(logits, y), before)
    loss.set_epoch(0)  # a resume that restarts earlier goes back to no weights
    assert loss.weight is None


def test_ldam_soft_targets_one_hot_equal_hard():
    loss = make({"name": "ldam", "drw_epoch": 0}, num_classes=3, class_counts=(40, 10, 2))
    loss.set_epoch(0)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(3)).tanh()
    y = torch.tensor([2, 0, 1, 2])
    assert torch.allclose(loss(logits, F.one_hot(y, 3).float()), loss(logits, y), atol=1e-5)


def test_ldam_buffers_follow_dtype_and_device():
    loss = make({"name": "ldam", "drw_epoch": 0}).to(torch.float64)
    assert loss.margins.dtype == torch.float64
    assert loss.state_dict() == {}  # derived from spec + counts, nothing to checkpoint
    if torch.cuda.is_available():
        loss = loss.cuda()
        out = loss(torch.randn(5, 3, device="cuda"), torch.tensor([0, 1, 2, 0, 1], device="cuda"))
        assert out.device.type == "cuda"


# ---------------------------------------------------------------- params


@pytest.mark.parametrize("spec, loc", [
    ({"name": "ldam", "s": 0}, ("ldam", "s")),
    ({"name": "ldam", "max_m": -1}, ("ldam", "max_m")),
    ({"name": "ldam", "drw_epoch": -1}, ("ldam", "drw_epoch")),
    ({"name": "cross_entropy", "label_smoothing": 1.0}, ("cross_entropy", "label_smoothing")),
    ({"name": "focal", "gamma": -0.5}, ("focal", "gamma")),
    ({"name": "bce", "smoothing": 0.1, "typo": 1}, ("bce", "typo")),
    ({"name": "cross_entropy", "class_weights": "inverse"}, ("cross_entropy", "class_weights")),
])
def test_invalid_params_rejected_with_field_path(spec, loc):
    with pytest.raises(ValidationError) as e:
        LOSS.validate_python(spec)
    locs = [err["loc"][:len(loc)] for err in e.value.errors()]
    assert loc in locs, e.value.errors()


def test_unknown_loss_name_lists_choices():
    with pytest.raises(ValidationError, match="cross_entropy"):
        LOSS.validate_python({"name": "hinge"})


def test_class_weight_length_checked_at_build():
    with pytest.raises(ValueError, match=r"loss.class_weights: 2 weights for 3 classes"):
        make({"name": "cross_entropy", "class_weights": [1.0, 2.0]})


def test_bad_target_shape_is_clear():
    loss = make({"name": "cross_entropy"})
    with pytest.raises(ValueError, match="soft targets"):
        loss(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("name", ["cross_entropy", "soft_target", "bce", "focal", "ldam"])
def test_stored_spec_with_defaults_written_out_revalidates(name):
    p = LOSS.validate_python({"name": name})
    assert LOSS.validate_python(LOSS.dump_python(p, mode="json")) == p


@pytest.mark.parametrize("value", ["inverse", [1.0, -2.0], [1.0, True], 3.0])
def test_class_weights_one_clear_error(value):
    with pytest.raises(ValidationError) as e:
        LOSS.validate_python({"name": "focal", "alpha": value})
    (err,) = e.value.errors()
    assert err["loc"] == ("focal", "alpha")
    assert err["msg"] == "must be 'balanced' or a list of numbers > 0"
