"""RunDirectory: config, metrics (including runs killed mid-write), sample grids, curve, checkpoints."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddpo_ray.records.grids import MIN_CELL_WIDTH
from ddpo_ray.records.run_dir import RunDirectory


@pytest.fixture
def run_dir(tmp_path):
    return RunDirectory(tmp_path / "outputs" / "run")


def test_creates_layout(run_dir, tmp_path):
    assert run_dir.root == tmp_path / "outputs" / "run"
    assert run_dir.samples_dir.is_dir()
    assert run_dir.checkpoints_dir.is_dir()
    assert run_dir.config_path.name == "config.yaml"
    assert run_dir.metrics_path.name == "metrics.jsonl"
    assert run_dir.reward_curve_path.name == "reward_curve.png"
    RunDirectory(run_dir.root)  # reopening an existing run is fine


# --- config ------------------------------------------------------------------------------


def test_config_round_trip_keeps_order(run_dir):
    config = {"run_name": "r", "seed": np.int64(3), "sample": {"num_steps": 10, "eta": 1.0},
              "prompts": ("a cat", "a dog"), "lr": 3e-4}
    path = run_dir.write_config(config)
    assert path == run_dir.config_path
    loaded = yaml.safe_load(path.read_text())
    assert loaded == {"run_name": "r", "seed": 3, "sample": {"num_steps": 10, "eta": 1.0},
                      "prompts": ["a cat", "a dog"], "lr": 3e-4}
    assert list(loaded) == ["run_name", "seed", "sample", "prompts", "lr"]
    run_dir.write_config({"seed": 4})  # overwrite, no temp files left behind
    assert yaml.safe_load(path.read_text()) == {"seed": 4}
    assert sorted(p.name for p in run_dir.root.iterdir()) == ["checkpoints", "config.yaml", "samples"]


# --- metrics -----------------------------------------------------------------------------


def test_metrics_append_read_converts_values(run_dir):
    assert run_dir.read_metrics() == []
    run_dir.append_metrics({
        "epoch": np.int64(0),
        "reward_mean": np.float32(0.5),
        "scalar_array": np.array(2.5),
        "vector": np.array([1, 2]),
        "tensor": torch.tensor(1.25),
        "nan": float("nan"),
        "inf": np.float64("inf"),
        "nested": {"x": [np.float32(float("nan")), 1]},
        "flag": np.bool_(True),
    })
    run_dir.append_metrics({"epoch": 1, "reward_mean": 0.75})
    rows = run_dir.read_metrics()
    assert rows == [
        {"epoch": 0, "reward_mean": 0.5, "scalar_array": 2.5, "vector": [1, 2], "tensor": 1.25,
         "nan": None, "inf": None, "nested": {"x": [None, 1]}, "flag": True},
        {"epoch": 1, "reward_mean": 0.75},
    ]
    assert type(rows[0]["epoch"]) is int
    lines = run_dir.metrics_path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
    assert "NaN" not in run_dir.metrics_path.read_text()


def test_metrics_rejects_unknown_value_type_naming_key(run_dir):
    with pytest.raises(TypeError, match=r"metrics\['bad'\]"):
        run_dir.append_metrics({"epoch": 0, "bad": object()})
    assert run_dir.read_metrics() == []


def test_truncated_last_line_is_skipped(run_dir):
    run_dir.append_metrics({"epoch": 0, "reward_mean": 0.1})
    run_dir.append_metrics({"epoch": 1, "reward_mean": 0.2})
    with open(run_dir.metrics_path, "a") as f:
        f.write('{"epoch": 2, "rew')  # killed mid-write
    with pytest.warns(UserWarning, match="line 3"):
        rows = run_dir.read_metrics()
    assert [row["epoch"] for row in rows] == [0, 1]


def test_append_after_truncated_line_drops_the_fragment(run_dir):
    run_dir.append_metrics({"epoch": 0})
    with open(run_dir.metrics_path, "a") as f:
        f.write('{"epoch": 1, "rew')
    run_dir.append_metrics({"epoch": 1})
    assert run_dir.read_metrics() == [{"epoch": 0}, {"epoch": 1}]


def test_corrupt_middle_line_raises_with_line_number(run_dir):
    run_dir.append_metrics({"epoch": 0})
    with open(run_dir.metrics_path, "a") as f:
        f.write("not json\n")
    run_dir.append_metrics({"epoch": 2})
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2"):
        run_dir.read_metrics()


def test_truncate_metrics(run_dir):
    for epoch in range(5):
        run_dir.append_metrics({"epoch": epoch, "reward_mean": epoch / 10})
    run_dir.truncate_metrics(after_epoch=2)
    assert [row["epoch"] for row in run_dir.read_metrics()] == [0, 1, 2]
    run_dir.append_metrics({"epoch": 3, "reward_mean": 0.3})
    assert [row["epoch"] for row in run_dir.read_metrics()] == [0, 1, 2, 3]
    run_dir.truncate_metrics(after_epoch=-1)
    assert run_dir.read_metrics() == []


def test_truncate_metrics_without_file_is_a_no_op(run_dir):
    run_dir.truncate_metrics(after_epoch=3)
    assert not run_dir.metrics_path.exists()


# --- sample grid -------------------------------------------------------------------------


def _images(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_sample_grid_layout_and_upscaling(run_dir):
    images = _images(5)
    prompts = ["a photo of a cat", "a very long prompt " * 10, "dog", "", "🐱 unicode"]
    path = run_dir.save_sample_grid(3, images, prompts, [0.1, -0.2, 0.3, float("nan"), 1.0])
    assert path == run_dir.samples_dir / "epoch_0003.png"
    with Image.open(path) as grid:
        grid.load()
    # 5 images -> 3 columns x 2 rows; 64 px upscaled 2x (nearest) to 128 px, captions below.
    width, height = grid.size
    assert 3 * MIN_CELL_WIDTH <= width < 3 * MIN_CELL_WIDTH + 20
    assert height > 2 * MIN_CELL_WIDTH + 2 * 20
    cell = np.asarray(grid)[2:2 + 128, 2:2 + 128]
    assert np.array_equal(cell[::2, ::2], images[0])  # nearest-neighbour: each pixel a 2x2 block
    assert np.array_equal(cell[1::2, 1::2], images[0])


def test_sample_grid_max_images_and_pil_input(run_dir):
    pil_images = [Image.fromarray(image) for image in _images(10, size=256)]
    path = run_dir.save_sample_grid(12, pil_images, ["p"] * 10, np.zeros(10), max_images=4)
    with Image.open(path) as grid:
        width, height = grid.size
    assert path.name == "epoch_0012.png"
    assert 2 * 256 <= width < 2 * 256 + 20  # 4 cells -> 2 x 2, no upscaling of 256 px images
    assert height > 2 * 256


def test_sample_grid_validates_inputs(run_dir):
    images = _images(3)
    with pytest.raises(ValueError, match="prompts: expected 3"):
        run_dir.save_sample_grid(0, images, ["a", "b"], [0.0] * 3)
    with pytest.raises(ValueError, match="rewards: expected 3"):
        run_dir.save_sample_grid(0, images, ["a"] * 3, [0.0] * 4)
    with pytest.raises(ValueError, match="prompts: .*single str"):
        run_dir.save_sample_grid(0, images, "abc", [0.0] * 3)
    with pytest.raises(ValueError, match="uint8"):
        run_dir.save_sample_grid(0, images.astype(np.float32) / 255, ["a"] * 3, [0.0] * 3)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        run_dir.save_sample_grid(0, images[..., :1], ["a"] * 3, [0.0] * 3)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        run_dir.save_sample_grid(0, [images[0], images[1, :32]], ["a"] * 2, [0.0] * 2)
    with pytest.raises(ValueError, match="epoch"):
        run_dir.save_sample_grid(-1, images, ["a"] * 3, [0.0] * 3)
    assert list(run_dir.samples_dir.iterdir()) == []


# --- reward curve ------------------------------------------------------------------------


def _assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100


@pytest.mark.parametrize("num_rows", [0, 1, 6])
def test_reward_curve_written(run_dir, num_rows):
    rows = [{"epoch": e, "reward_mean": math.sin(e), "reward_std": 0.1} for e in range(num_rows)]
    path = run_dir.save_reward_curve(rows)
    assert path == run_dir.reward_curve_path
    _assert_png(path)


def test_reward_curve_from_file_with_eval_and_gaps(run_dir):
    run_dir.append_metrics({"epoch": 0, "reward_mean": 0.1})  # no std
    run_dir.append_metrics({"epoch": 1, "reward_mean": float("nan"), "reward_std": 0.1})  # null
    run_dir.append_metrics({"epoch": 2, "approx_kl": 0.0})  # no reward at all
    run_dir.append_metrics({"epoch": 3, "reward_mean": 0.3, "reward_std": 0.05, "eval_reward_mean": 0.25})
    _assert_png(run_dir.save_reward_curve())
    _assert_png(run_dir.save_reward_curve(key="approx_kl", std_key="none"))


# --- checkpoints -------------------------------------------------------------------------


def test_checkpoints_listing_ignores_incomplete(run_dir):
    assert run_dir.list_checkpoints() == []
    assert run_dir.latest_checkpoint() is None
    assert run_dir.checkpoint_path(7) == run_dir.checkpoints_dir / "epoch_0007"
    assert not run_dir.checkpoint_path(7).exists()

    for epoch in (1, 12, 3):
        run_dir.checkpoint_path(epoch).mkdir()
        run_dir.mark_checkpoint_complete(epoch)
    run_dir.checkpoint_path(20).mkdir()  # half-written: no COMPLETE marker
    (run_dir.checkpoints_dir / "epoch_0030.tmp").mkdir()  # not a checkpoint name
    (run_dir.checkpoints_dir / "epoch_0030.tmp" / "COMPLETE").touch()
    (run_dir.checkpoints_dir / "epoch_0040").touch()  # a file, not a directory

    assert run_dir.list_checkpoints() == [
        (1, run_dir.checkpoint_path(1)),
        (3, run_dir.checkpoint_path(3)),
        (12, run_dir.checkpoint_path(12)),
    ]
    assert run_dir.latest_checkpoint() == run_dir.checkpoint_path(12)


def test_mark_checkpoint_complete_requires_directory(run_dir):
    with pytest.raises(FileNotFoundError, match="epoch_0005"):
        run_dir.mark_checkpoint_complete(5)


# --- a new run never lands in an earlier run's directory ---------------------------------


def _earlier_run(root):
    earlier = RunDirectory(root)
    earlier.write_config({"seed": 0})
    earlier.append_metrics({"epoch": 0, "reward_mean": 1.0})
    return earlier


def test_a_new_run_refuses_an_existing_run_directory(tmp_path):
    from ddpo_ray.records.run_dir import RunDirectoryExistsError, check_new_run

    root = tmp_path / "outputs" / "r"
    check_new_run(root, None)  # nothing there yet
    RunDirectory(root)
    check_new_run(root, None)  # empty layout only: nothing to lose
    _earlier_run(root)
    with pytest.raises(RunDirectoryExistsError, match=r"run directory .*outputs/r already holds a run.*resume_from=latest.*run_name"):
        check_new_run(root, None)
    check_new_run(root, "latest")  # a resume continues it
    only_checkpoints = tmp_path / "outputs" / "c"
    RunDirectory(only_checkpoints).checkpoint_path(0).mkdir()
    with pytest.raises(RunDirectoryExistsError, match="checkpoints"):
        check_new_run(only_checkpoints, None)


def test_the_epoch_loop_and_the_cli_refuse_to_merge_into_an_earlier_run(tmp_path):
    """Measured before: a second run appended epochs 0, 1 to the old 0, 1, 2."""
    from ddpo_ray.config import build_config
    from ddpo_ray.local import main as local_main
    from ddpo_ray.records.run_dir import RunDirectoryExistsError
    from ddpo_ray.training.epoch_loop import EpochLoop

    _earlier_run(tmp_path / "r")
    before = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    cfg = build_config(overrides=[f"output_dir={tmp_path}", "run_name=r", "metrics=false"])
    with pytest.raises(RunDirectoryExistsError, match="resume_from"):
        EpochLoop(cfg, backend=None, exporter="off")
    assert local_main([f"output_dir={tmp_path}", "run_name=r", "metrics=false"]) == 2
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == before


# --- checkpoints: atomic, marked complete last, loaded without running code --------------


class _Payload:
    """A pickle that creates `marker` when unpickled: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A real checkpoint of the tiny UNet with a LoRA, an optimizer that stepped, a tracker with history."""
    from ddpo_ray.maths.advantages import AdvantageEstimator
    from ddpo_ray.models.lora import add_lora
    from ddpo_ray.models.pipelines import tiny_unet_and_vae
    from ddpo_ray.records.checkpoint import save_checkpoint

    torch.manual_seed(0)
    unet, _ = tiny_unet_and_vae()
    params = add_lora(unet, rank=2)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    advantages = AdvantageEstimator("per_prompt", 4, 1)
    advantages(np.array(["a cat", "a dog"]), np.array([1.0, 2.0]))  # numpy strings as prompts
    run_dir = RunDirectory(tmp_path / "run")
    directory = save_checkpoint(run_dir, 0, unet, True, optimizer, advantages, policy_version=1)
    return run_dir, directory, unet, optimizer, advantages


def test_a_checkpoint_loads_with_weights_only(tiny_checkpoint):
    from ddpo_ray.records.checkpoint import LEARNER_STATE, RUN_STATE, read_learner_state, resolve_resume_path

    run_dir, directory, *_ = tiny_checkpoint
    assert resolve_resume_path(str(directory), run_dir) == directory
    assert read_learner_state(directory)["use_lora"] is True
    state = torch.load(directory / RUN_STATE, weights_only=True)
    assert state["epoch"] == 0 and set(state["advantages"]["tracker"]["buffers"]) == {"a cat", "a dog"}
    torch.load(directory / LEARNER_STATE, weights_only=True)
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_a_state_as_bytes_round_trips_and_a_crafted_one_is_refused(tmp_path):
    """The learner hands its state to the driver as the bytes of its .pt file (through the
    epoch exchange); reading them back is as strict as reading the file."""
    from ddpo_ray.records.checkpoint import state_bytes, state_from_bytes

    state = {"use_lora": True, "weights": {"a.lora_A.weight": torch.randn(4, 2)},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.01}]}}
    back = state_from_bytes(state_bytes(state), "the learner's checkpoint of epoch 1")
    assert back["use_lora"] is True and back["optimizer"]["param_groups"] == [{"lr": 0.01}]
    assert torch.equal(back["weights"]["a.lora_A.weight"], state["weights"]["a.lora_A.weight"])
    marker = tmp_path / "code-ran"
    crafted = state_bytes({"weights": _Payload(marker)})
    with pytest.raises(ValueError, match="the learner's checkpoint of epoch 1: refused to load"):
        state_from_bytes(crafted, "the learner's checkpoint of epoch 1")
    assert not marker.exists()


@pytest.mark.parametrize("state_file", ["learner_state.pt", "run_state.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(tiny_checkpoint, tmp_path, state_file):
    from ddpo_ray.maths.advantages import AdvantageEstimator
    from ddpo_ray.records.checkpoint import load_policy_weights, load_run_state

    _, directory, *_ = tiny_checkpoint
    marker = tmp_path / "code-ran"
    torch.save({"use_lora": True, "weights": _Payload(marker)}, directory / state_file)
    with pytest.raises(ValueError, match=rf"{state_file}: refused to load.*weights_only=True"):
        if state_file == "learner_state.pt":
            load_policy_weights(directory)  # the path of `evaluate --checkpoint`
        else:
            load_run_state(directory, AdvantageEstimator("per_prompt", 4, 1))  # the path of resume_from
    assert not marker.exists()


def test_a_rewrite_cut_short_leaves_no_complete_marker_and_no_half_file(tiny_checkpoint, monkeypatch):
    """The fault (a failing write mid-checkpoint) is injected: a real kill cannot be timed here."""
    from ddpo_ray.records import checkpoint
    from ddpo_ray.records.run_dir import COMPLETE_MARKER

    run_dir, directory, unet, optimizer, _ = tiny_checkpoint
    old = (directory / checkpoint.LEARNER_STATE).read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_learner_state(directory, unet, True, optimizer)
    assert not (directory / COMPLETE_MARKER).exists()
    assert (directory / checkpoint.LEARNER_STATE).read_bytes() == old  # the old file, whole
    assert run_dir.latest_checkpoint() is None  # `latest` skips it
    with pytest.raises(FileNotFoundError, match=r"epoch_0000 has no COMPLETE marker.*cut short"):
        checkpoint.resolve_resume_path(str(directory), run_dir)  # an explicit resume_from too


def _complete(run_dir, epoch):
    run_dir.checkpoint_path(epoch).mkdir(parents=True)
    (run_dir.checkpoint_path(epoch) / "learner_state.pt").write_bytes(b"x")
    run_dir.mark_checkpoint_complete(epoch)


def test_prune_keeps_the_newest_complete_checkpoints_best_and_those_in_progress(run_dir):
    for epoch in range(5):
        _complete(run_dir, epoch)
    run_dir.best_dir.mkdir()
    (run_dir.best_dir / "best.json").write_text("{}")
    run_dir.checkpoint_path(5).mkdir()  # the learner's next one, not complete yet
    removed = run_dir.prune_checkpoints(2)
    assert [p.name for p in removed] == ["epoch_0000", "epoch_0001", "epoch_0002"]
    assert sorted(p.name for p in run_dir.checkpoints_dir.iterdir()) == ["best", "epoch_0003", "epoch_0004", "epoch_0005"]
    assert run_dir.latest_checkpoint() == run_dir.checkpoint_path(4)
    assert run_dir.prune_checkpoints(0) == [] and len(run_dir.list_checkpoints()) == 2  # 0: keep all
    assert [p.name for p in run_dir.prune_checkpoints(1)] == ["epoch_0003"]
    with pytest.raises(ValueError, match="keep_last_n"):
        run_dir.prune_checkpoints(-1)


def test_the_learner_state_travels_as_values_and_the_writer_makes_the_same_checkpoint(tiny_checkpoint, tmp_path):
    """The distributed learner hands `learner_state` to the driver, which writes it (no node but
    the driver's sees the run directory): the files and the restored state are what the
    single-process writer gives, and the values are a copy on the CPU."""
    from ddpo_ray.records import checkpoint

    run_dir, directory, unet, optimizer, _ = tiny_checkpoint
    state = checkpoint.learner_state(unet, True, optimizer)
    assert all(t.device.type == "cpu" for t in state["weights"].values())
    with torch.no_grad():
        next(p for p in unet.parameters() if p.requires_grad).add_(1.0)  # the live model moves on
    written = tmp_path / "written"
    checkpoint.write_learner_state(written, state)
    assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in directory.iterdir() if p.name != "COMPLETE"
                                                               and p.name != checkpoint.RUN_STATE)
    use_lora, weights = checkpoint.load_policy_weights(written)
    assert use_lora and weights.keys() == state["weights"].keys()
    checkpoint.restore_learner_state(checkpoint.read_learner_state(written), unet, True, optimizer)
    for name, value in checkpoint.learner_state(unet, True, optimizer)["weights"].items():
        torch.testing.assert_close(value, state["weights"][name])
    with pytest.raises(ValueError, match=r"the learner state has use_lora=True, the config has False"):
        checkpoint.restore_learner_state(state, unet, False, optimizer)


def test_a_full_fine_tunes_checkpoint_holds_its_unet_as_one_safetensors_file(tmp_path):
    from ddpo_ray.records import checkpoint

    unet = torch.nn.Linear(3, 2)  # any module: a full fine-tune's trainable state is its state dict
    optimizer = torch.optim.Adam(unet.parameters())
    unet(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpoint.write_learner_state(tmp_path, checkpoint.learner_state(unet, False, optimizer))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.LEARNER_STATE, checkpoint.POLICY_WEIGHTS]
    use_lora, weights = checkpoint.load_policy_weights(tmp_path)
    assert not use_lora and sorted(weights) == ["bias", "weight"]
    assert checkpoint.read_learner_state(tmp_path)["optimizer"]["state"][0]["step"] == 1
