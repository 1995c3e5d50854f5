"""`trainctl schedule preview` and `trainctl plot`: the preview is the worker's schedule
code driven in the loop's order; the plots are real PNGs."""
from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import digits_spec
from trainctl.client.cli import main
from trainctl.client.preview import preview_spec, sparkline
from trainctl.spec import parse_spec
from trainctl.workers.engine.data import build_data
from trainctl.schedules import apply_control, build_schedule, preview

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec))
    return p


def _assert_png(path: Path, min_bytes: int = 10_000) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert len(data) > min_bytes, f"PNG only {len(data)} bytes"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert w > 500 and h > 300
    return w, h


def _cosine_spec(**over) -> dict:
    spec = digits_spec("pv", epochs=5)
    spec["schedule"] = {"name": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-3, "min_lr": 1e-4}
    spec.update(over)
    return spec


# ---------------------------------------------------------------------- preview values
def test_preview_equals_build_schedule_for_cosine():
    spec = parse_spec(_cosine_spec(), check_model=False)
    p = preview_spec(spec, steps_per_epoch=17)
    sched = build_schedule(spec.schedule, base_lr=spec.optimizer.lr, steps_per_epoch=17, epochs=5)
    assert p.steps_per_epoch == 17 and p.epochs == 5 and len(p.lr) == 85
    assert p.lr == [sched.lr_at(s) for s in range(85)]          # bit-for-bit, not approx
    assert p.lr == preview(spec.schedule, base_lr=0.1, steps_per_epoch=17, epochs=5)


def test_steps_per_epoch_from_dataset_like_the_loop():
    raw = _cosine_spec()
    spec = parse_spec(raw, check_model=False)
    batches = len(build_data(spec.data, seed=spec.train.seed).train)
    assert preview_spec(spec).steps_per_epoch == batches
    raw["train"] = {**raw["train"], "grad_accum": 2, "max_steps_per_epoch": 0}
    assert preview_spec(raw).steps_per_epoch == batches // 2
    raw["train"] = {**raw["train"], "grad_accum": 2, "max_steps_per_epoch": 5}
    p = preview_spec(raw)
    assert p.steps_per_epoch == 5 and len(p.lr) == 5 * 5 and p.steps_per_epoch_source == "dataset"


def test_spec_controls_change_the_curve_as_the_schedule_api_says():
    k, v = 23, 0.0123
    raw = _cosine_spec(control=[{"at_step": k, "set_lr": v}, {"at_step": 50, "scale_lr": 0.5},
                                {"at_step": 60, "set_ema_decay": 0.99}])
    spec = parse_spec(raw, check_model=False)
    p = preview_spec(spec, steps_per_epoch=17)
    plain = preview_spec(parse_spec(_cosine_spec(), check_model=False), steps_per_epoch=17).lr
    assert p.lr[k] == v                                              # exactly v at the applied step
    assert p.lr[:k] == plain[:k]                                     # untouched before
    ratio = v / plain[k]
    for s in range(k, 50):                                           # the shape is kept: original x v/old
        assert p.lr[s] == pytest.approx(plain[s] * ratio, rel=1e-12)
    assert p.lr[50] == pytest.approx(plain[50] * ratio * 0.5, rel=1e-12)
    # same numbers as the schedule API driven by hand, and as schedulers.preview
    sched = build_schedule(spec.schedule, base_lr=0.1, steps_per_epoch=17, epochs=5)
    by_hand = []
    for s in range(85):
        if s == k:
            apply_control(sched, s, "set_lr", v)
        if s == 50:
            apply_control(sched, s, "scale_lr", 0.5)
        by_hand.append(sched.lr_at(s))
    assert p.lr == by_hand
    assert p.lr == preview(spec.schedule, base_lr=0.1, steps_per_epoch=17, epochs=5,
                           controls=[(k, "set_lr", v), (50, "scale_lr", 0.5)])
    status = {c.verb: c for c in p.controls}
    assert status["set_lr"].status == "APPLIED" and status["set_lr"].new_value == v
    assert status["set_ema_decay"].status == "NOT_LR"


def test_set_lr_decay_and_refused_controls():
    raw = digits_spec("st", epochs=6)
    raw["schedule"] = {"name": "step", "step_size": 2, "gamma": 0.1}
    raw["control"] = [{"at_step": 30, "set_lr_decay": 0.5}, {"at_step": 1000, "set_lr": 0.3}]
    p = preview_spec(raw, steps_per_epoch=10)
    assert p.lr[19] == pytest.approx(0.1) and p.lr[20] == pytest.approx(0.01)   # first decay: old gamma
    assert p.lr[40] == pytest.approx(0.005)                                     # later decay: the new one
    assert [c.status for c in p.controls] == ["APPLIED", "NEVER"]
    # a schedule without a decay factor: refused as the worker refuses it, curve unchanged
    raw["schedule"] = {"name": "constant"}
    raw["control"] = [{"at_step": 5, "set_lr_decay": 0.5}]
    p = preview_spec(raw, steps_per_epoch=10)
    assert p.controls[0].status == "REJECTED" and "decay" in p.controls[0].message
    assert set(p.lr) == {0.1}


def test_sparkline():
    assert sparkline([0.0, 1.0], width=2) == "▁█"
    assert len(sparkline([float(i) for i in range(1000)], width=40)) == 40
    assert sparkline([0.5] * 10) == "▄" * 10


# ---------------------------------------------------------------------- the CLI
def test_cli_preview_json(tmp_path, capsys):
    path = _write(tmp_path, _cosine_spec(control=[{"at_step": 23, "set_lr": 0.0123}]))
    assert main(["schedule", "preview", str(path), "--json", "--steps-per-epoch", "17"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps_per_epoch"] == 17 and out["epochs"] == 5 and len(out["lr"]) == 85
    assert out["lr"][23] == 0.0123 and out["schedule"] == "cosine"
    assert out["controls"][0]["status"] == "APPLIED"


def test_cli_preview_text_and_png(tmp_path, capsys):
    spec = _cosine_spec(control=[{"at_step": 40, "set_lr": 0.02}, {"at_step": 42, "scale_lr": 2.0},
                                 {"at_step": 90, "set_lr_decay": 0.5}])
    path, png = _write(tmp_path, spec), tmp_path / "out" / "preview.png"
    assert main(["schedule", "preview", str(path), "--png", str(png)]) == 0   # steps from the dataset
    out = capsys.readouterr().out
    assert "EPOCH" in out and "FIRST LR" in out and "set_lr 0.02" in out and str(png) in out
    assert any(ch in out for ch in "▁▂▃▄▅▆▇█")
    _assert_png(png)


def test_cli_preview_invalid_spec_exit_2(tmp_path, capsys):
    bad = _cosine_spec()
    bad["schedule"] = {"name": "cosine", "warmup_epochs": -1}
    assert main(["schedule", "preview", str(_write(tmp_path, bad))]) == 2
    assert "schedule.warmup_epochs" in capsys.readouterr().err
    bad = _cosine_spec(control=[{"at_step": 3, "set_lr": -1}])
    assert main(["schedule", "preview", str(_write(tmp_path, bad, "b2.yaml")), "--json"]) == 2
    assert "control.0" in capsys.readouterr().err
    assert main(["schedule", "preview", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["schedule", "preview", str(_write(tmp_path, _cosine_spec(), "ok.yaml")),
                 "--steps-per-epoch", "0"]) == 2
    assert "--steps-per-epoch" in capsys.readouterr().err


# ---------------------------------------------------------------------- plot
@pytest.mark.slow  # trains a (tiny) real model in a worker process
def test_cli_plot_experiment_with_control(cluster, tmp_path, capsys):
    cluster.add_worker("w0", "--max-runs", "1")   # exits after the run: quick teardown
    spec = digits_spec("p", epochs=1, max_steps=5, control=[{"at_step": 2, "set_lr": 0.01}])
    spec["train"].update(ema={"decay": 0.9}, checkpoint_every=0)   # no checkpoint: nothing to resume
    spec["max_restarts"] = 0
    with cluster.client() as c:
        x = c.submit(spec)
        deadline = time.monotonic() + 120
        while not c.get(x.id).is_final and time.monotonic() < deadline:
            time.sleep(0.2)
        final = c.get(x.id)
        assert final.state == "COMPLETED", cluster.logs()
    png = tmp_path / "plot.png"
    assert main(["plot", str(x.id), "--png", str(png), "--server", cluster.address, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["controls"] == [{"applied_step": 2, "label": "set_lr 0.01"}]
    assert {"STEP/lr", "STEP/loss", "STEP/acc", "EPOCH/val_top1", "EPOCH/ema_val_top1"} <= set(out["series"])
    _assert_png(png)
    # an unknown experiment: the server's NOT_FOUND, exit 2
    assert main(["plot", "999999", "--png", str(tmp_path / "x.png"), "--server", cluster.address]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_experiment_png_without_a_server(tmp_path):
    """The plot function on its own: long downsampled series, many control events."""
    from trainctl.client.plot import experiment_png
    from trainctl.client.sdk import ControlResult, ExperimentInfo

    spe, epochs = 400, 10
    steps = list(range(spe * epochs))
    lr = [0.1 * (1 - s / len(steps)) + 1e-4 for s in steps]
    loss = [2.3 * (0.999 ** s) + 0.1 * ((s * 7919) % 13) / 13 for s in steps]
    acc = [min(1.0, 0.1 + s / len(steps)) for s in steps]
    ep_steps = [spe * (e + 1) for e in range(epochs)]

    def series(st, vals):  # epoch rows are logged at the step count after the epoch
        return {"step": st, "epoch": [min(s // spe, epochs - 1) if st is steps else s // spe - 1 for s in st],
                "value": vals}

    metrics = {"STEP/lr": series(steps, lr), "STEP/loss": series(steps, loss), "STEP/acc": series(steps, acc),
               "EPOCH/train_loss": series(ep_steps, [1.0 / (e + 1) for e in range(epochs)]),
               "EPOCH/val_loss": series(ep_steps, [1.1 / (e + 1) for e in range(epochs)]),
               "EPOCH/val_top1": series(ep_steps, [0.5 + e / 25 for e in range(epochs)])}
    x = ExperimentInfo(id=7, name="synthetic", state="RUNNING", spec={"schedule": {"name": "linear"},
                       "optimizer": {"lr": 0.1}}, attempt=1, worker_id="w", message="", summary={}, last_step=3999,
                       created_at=None, started_at=None, finished_at=None, replay_of=0)

    def rec(step, kind, value, status="APPLIED"):
        return ControlResult(command_id=str(step), experiment_id=7, kind=kind, value=value, status=status,
                             source="LIVE", applied_step=step, old_value=None, new_value=value, message="",
                             requested_at=None, applied_at=None, at_step=None)

    controls = [rec(1000 + 10 * i, "SET_LR", 0.05 - 0.005 * i) for i in range(5)]
    controls += [rec(2500, "SET_LR_DECAY", 0.5), rec(3990, "SCALE_LR", 2.0), rec(3000, "SET_LR", 5.0, "REJECTED")]
    out = experiment_png(x, metrics, controls, tmp_path / "exp.png")
    assert len(out["controls"]) == 7 and "set_lr 0.05" in [c["label"] for c in out["controls"]]
    assert {"STEP/lr", "STEP/loss", "STEP/acc", "EPOCH/val_top1"} <= set(out["series"])
    _assert_png(tmp_path / "exp.png")
    with pytest.raises(ValueError, match="no step metrics"):
        experiment_png(x, {}, [], tmp_path / "empty.png")


def _captured_png(monkeypatch, build):
    """Run a plot function, keeping its figure (drawn and saved) for inspection."""
    from trainctl.client import plot

    figs = []

    def keep(fig, path):
        fig.savefig(path)
        figs.append(fig)
        return path

    monkeypatch.setattr(plot, "_finish", keep)
    out = build()
    return figs[0], out


def _neighbours(tmp_path):
    from trainctl.client.plot import experiment_png
    from trainctl.client.sdk import ControlResult, ExperimentInfo

    spe, steps = 22, list(range(132))

    def series(st, vals):
        return {"step": st, "epoch": [s // spe for s in st], "value": vals}

    ep = [spe * (e + 1) for e in range(6)]
    metrics = {"STEP/lr": series(steps, [0.1] * 132), "STEP/loss": series(steps, [2.3 - 0.01 * s for s in steps]),
               "EPOCH/val_loss": {"step": ep, "epoch": list(range(6)), "value": [11.2, 1.5, 1.0, 0.8, 0.6, 0.5]},
               "EPOCH/val_top1": {"step": ep, "epoch": list(range(6)), "value": [0.1, 0.5, 0.7, 0.8, 0.9, 0.9]}}
    x = ExperimentInfo(id=7, name="n", state="COMPLETED", spec={}, attempt=1, worker_id="", message="", summary={},
                       last_step=131, created_at=None, started_at=None, finished_at=None, replay_of=0)

    def rec(step, kind, value):
        return ControlResult(f"{step}{kind}", 7, kind, value, "APPLIED", "LIVE", step, None, value, "", None, None,
                             None)

    controls = [rec(50, "SET_LR", 0.01), rec(51, "SCALE_LR", 0.5), rec(52, "SET_LR", 0.02),
                rec(60, "SET_LR_DECAY", 0.5)]
    return lambda: experiment_png(x, metrics, controls, tmp_path / "n.png")


def test_control_labels_at_neighbouring_steps_do_not_touch(tmp_path, monkeypatch):
    import itertools

    from matplotlib.text import Annotation

    fig, out = _captured_png(monkeypatch, _neighbours(tmp_path))
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    boxes = [a.get_bbox_patch().get_window_extent(r) for a in ax.get_children() if isinstance(a, Annotation)]
    assert len(boxes) == 4  # every label shown
    gap = 1.0  # px between any two labels' white boxes
    for a, b in itertools.combinations(boxes, 2):
        assert not a.padded(gap / 2).overlaps(b.padded(gap / 2)), (a, b)


def test_loss_panel_is_not_flattened_by_one_outlier(tmp_path, monkeypatch):
    fig, out = _captured_png(monkeypatch, _neighbours(tmp_path))
    ax_loss = fig.axes[1]
    assert out["loss_scale"] == "log" and ax_loss.get_yscale() == "log"
    # batch losses 1.0-2.3 take a fair share of the panel's height, not a sliver under 11.2
    lo, hi = (math.log10(v) for v in ax_loss.get_ylim())
    assert (math.log10(2.3) - math.log10(1.0)) / (hi - lo) > 0.2  # linear: 0.11

    from trainctl.client.plot import _loss_axis

    import matplotlib.pyplot as plt

    fig2, ax = plt.subplots()
    vals = [0.5 + 0.001 * i for i in range(500)] + [-0.1, 40.0]   # not all positive: robust linear axis
    assert _loss_axis(ax, vals) == "linear" and ax.get_ylim()[1] < 2
    plt.close(fig2)
