"""`trainctl.datasize`: steps per epoch from the spec alone (no data loaded, no torch), the
one count the server's dry runs and `schedule preview` share, against the real loaders."""
import pytest

from trainctl.spec import parse_spec
from trainctl.datasize import steps_per_epoch, train_samples


def _spec(**data):
    return parse_spec({"name": "x", "model": {"name": "resnet10t"}, "data": data,
                       "train": {"epochs": 2}}, check_model=False)


@pytest.mark.parametrize("data", [
    {"dataset": "digits"},
    {"dataset": "digits", "val_fraction": 0.33, "batch_size": 100},
    {"dataset": "digits", "val_fraction": 0.7, "batch_size": 1000},  # fewer samples than a batch
    {"dataset": "digits_lt"},
    {"dataset": "digits_lt", "imbalance_ratio": 50, "val_fraction": 0.25, "batch_size": 16},
    {"dataset": "synthetic", "num_samples": 1001, "batch_size": 64},
    {"dataset": "synthetic", "val_fraction": 0.5},
])
def test_counts_match_the_real_loader(data):
    from trainctl.workers.engine.data import build_data

    spec = _spec(**data)
    real = build_data(spec.data, seed=0)
    assert train_samples(spec.data) == len(real.train.dataset)
    assert steps_per_epoch(spec) == spec.train.steps_per_epoch(len(real.train), spec.data.batch_size)


def test_imagefolder_is_unknown_until_the_worker_counts_it():
    assert steps_per_epoch(_spec(dataset="imagefolder", path="/data/x")) is None


def test_no_torch_needed():
    import subprocess
    import sys

    code = ("import sys; from trainctl.datasize import steps_per_epoch; "
            "import trainctl.server.steering; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
