"""Experiment trackers: TensorBoard event files and W&B offline runs, written by the real
libraries and read back.

TensorBoard's own EventAccumulator reads the event files; the W&B run file (run-<id>.wandb, a
LevelDB-style log of wandb's protobuf records) is read with wandb's own protobuf classes.
W&B runs offline (WANDB_MODE=offline, WANDB_DIR under tmp_path): no server is reachable here.
Nothing is mocked; a missing extra is made missing for real (its module blocked in sys.modules).
"""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpo_ray.config import ConfigError, build_config
from ddpo_ray.local import main as local_main
from ddpo_ray.records.run_dir import RunDirectory
from ddpo_ray.records.trackers import (
    TENSORBOARD_DIR,
    WANDB_ID_FILE,
    TrackerNotInstalledError,
    check_trackers_installed,
    open_trackers,
    scalars,
)
from tests.helpers import PLAIN


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    directory = tmp_path / "wandb_dir"
    directory.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(directory))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return directory


def tensorboard_events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def tb_image(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def wandb_records(wandb_dir: Path) -> tuple[Path, list]:
    """(the offline run directory, its records) of the one W&B run under `wandb_dir`."""
    from wandb.proto import wandb_internal_pb2

    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (path,) = runs[0].glob("run-*.wandb")
    data, block, pos = path.read_bytes(), 32768, 7  # 7: the file header ":W&B", magic, version
    assert data[:4] == b":W&B"
    chunks, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return runs[0], records


def wandb_history(records) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def wandb_config(records) -> dict:
    config = {}
    for record in records:
        if record.WhichOneof("record_type") in ("run", "config"):
            items = record.run.config.update if record.WhichOneof("record_type") == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    return config


# --- the config -----------------------------------------------------------------------------


def test_config_names_trackers_in_its_errors():
    assert build_config().trackers == []
    assert build_config(overrides=["trackers=[tensorboard, wandb]"]).trackers == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"trackers: unknown \['mlflow'\]; expected any of \['tensorboard', 'wandb'\]"):
        build_config(overrides=["trackers=[tensorboard, mlflow]"])
    with pytest.raises(ConfigError, match="trackers: .* names a tracker twice"):
        build_config(overrides=["trackers=[wandb, wandb]"])


def test_a_missing_extra_is_named_before_the_run_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(TrackerNotInstalledError, match=r"pip install 'ddpo-ray\[wandb\]'"):
        check_trackers_installed(["tensorboard", "wandb"])
    with pytest.raises(TrackerNotInstalledError, match=r"ddpo-ray\[wandb\]"):
        open_trackers(["wandb"], tmp_path, {}, 0)
    assert local_main([f"output_dir={tmp_path}", "run_name=x", "trackers=[wandb]"]) == 2
    assert "pip install 'ddpo-ray[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing was started


def test_no_trackers_imports_no_tracker(tmp_path):
    before = {"wandb", "tensorboard"} & set(sys.modules)
    trackers = open_trackers([], tmp_path, {}, 0)
    assert not trackers
    trackers.close()
    assert {"wandb", "tensorboard"} & set(sys.modules) == before


# --- the records, through RunDirectory (what both loops write) -------------------------------


def _rows():
    return [
        {"epoch": 0, "samples": 8, "reward_mean": -3.5, "loss": 0.25, "eval_is_best": True, "eval_best_version": None,
         "note": "text is left out"},
        {"epoch": 1, "samples": 8, "reward_mean": -3.0, "loss": 0.125, "eval_is_best": False, "eval_best_version": 1},
    ]


def test_scalars_are_the_numeric_values_of_a_row():
    assert scalars(_rows()[0]) == {"samples": 8.0, "reward_mean": -3.5, "loss": 0.25, "eval_is_best": 1.0}


def test_run_directory_sends_rows_and_grids_to_tensorboard_and_wandb(tmp_path, wandb_offline):
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.trackers = open_trackers(["tensorboard", "wandb"], run_dir.root, {"run_name": "run", "seed": 3}, 0)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    try:
        run_dir.save_eval_grid(0, images, ["a", "b", "c", "d"], [0.0] * 4)
        for row in _rows():
            run_dir.save_eval_grid(row["epoch"] + 1, images, ["a", "b", "c", "d"], [1.0] * 4)
            run_dir.append_metrics(row)
            run_dir.save_sample_grid(row["epoch"], images, ["a", "b", "c", "d"], [1.0] * 4)
    finally:
        run_dir.trackers.close()

    events = tensorboard_events(run_dir.root / TENSORBOARD_DIR)
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(0, -3.5), (1, -3.0)]
    assert [e.value for e in events.Scalars("eval_is_best")] == [1.0, 0.0]
    assert [e.step for e in events.Scalars("eval_best_version")] == [1]  # None is not a value
    assert "note" not in events.Tags()["scalars"] and "epoch" not in events.Tags()["scalars"]
    assert [e.step for e in events.Images("samples")] == [0, 1]
    assert [e.step for e in events.Images("eval")] == [0, 1]
    assert [e.step for e in events.Images("eval_base")] == [0]
    written = np.asarray(Image.open(run_dir.samples_dir / "epoch_0001.png").convert("RGB"))
    assert np.array_equal(tb_image(events.Images("samples")[1]), written)  # the grid itself

    run, records = wandb_records(wandb_offline)
    assert run.name.endswith((run_dir.root / WANDB_ID_FILE).read_text().strip())
    history = wandb_history(records)
    rewards = [(row["_step"], row["reward_mean"]) for row in history if "reward_mean" in row]
    assert rewards == [(0, -3.5), (1, -3.0)]
    images_logged = [(row["_step"], key) for row in history for key in row if key.endswith("/_type")]
    assert {(0, "samples/_type"), (1, "samples/_type"), (0, "eval_base/_type"), (1, "eval/_type")} <= set(images_logged)
    assert len(list((run / "files" / "media" / "images").glob("samples_*.png"))) == 2
    assert wandb_config(records)["seed"] == 3


@pytest.mark.slow
def test_a_local_run_logs_its_epochs_to_both_trackers_and_a_resume_continues(tmp_path, wandb_offline):
    overrides = [*PLAIN, "sample.num_steps=3", "sample.batch_size=4", "sample.num_batches_per_epoch=2",
                 "train.batch_size=8", "eval.every=1", "eval.prompts_per_group=2", "metrics=false",
                 "trackers=[tensorboard, wandb]", f"output_dir={tmp_path}", "run_name=t"]
    assert local_main([*overrides, "num_epochs=2"]) == 0
    root = tmp_path / "t"
    metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    events = tensorboard_events(root / TENSORBOARD_DIR)
    for key in ("reward_mean", "reward_std", "loss", "approx_kl", "eval_reward_mean", "time_epoch"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (row["epoch"], pytest.approx(row[key], rel=1e-6)) for row in metrics], key  # float32 in events
    assert [e.step for e in events.Images("samples")] == [0, 1]
    assert [e.step for e in events.Images("eval")] == [0, 1] and len(events.Images("eval_base")) == 1
    _, records = wandb_records(wandb_offline)
    history = [row for row in wandb_history(records) if "reward_mean" in row]
    assert [(row["_step"], row["reward_mean"]) for row in history] == [(m["epoch"], m["reward_mean"]) for m in metrics]
    assert wandb_config(records)["run_name"] == "t"

    # A resumed run continues the same W&B run and TensorBoard log with the epochs after its checkpoint.
    run_id = (root / WANDB_ID_FILE).read_text().strip()
    assert local_main([*overrides, "num_epochs=3", "resume_from=latest"]) == 0
    assert (root / WANDB_ID_FILE).read_text().strip() == run_id
    events = tensorboard_events(root / TENSORBOARD_DIR)
    assert [e.step for e in events.Scalars("reward_mean")] == [0, 1, 2]
