"""Config: presets, YAML + overrides, and errors that name the bad field."""

import pytest

from ddpo_ray.config import PRESETS, ConfigError, DDPOConfig, build_config


def test_default_is_tiny_and_valid():
    cfg = build_config()
    assert cfg.preset == "tiny" and cfg.model.pretrained == "tiny"
    assert cfg.samples_per_epoch == 64


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = build_config(preset=name)
    assert cfg.preset == name


def test_paper_presets_use_the_paper_hyperparameters():
    cfg = build_config(preset="sd15_aesthetic")
    assert (cfg.sample.num_steps, cfg.sample.eta, cfg.sample.guidance_scale) == (50, 1.0, 5.0)
    assert cfg.samples_per_epoch == 256
    assert (cfg.train.clip_range, cfg.train.adv_clip_max, cfg.train.learning_rate) == (1e-4, 5.0, 3e-4)
    assert (cfg.advantage.mode, cfg.advantage.buffer_size, cfg.advantage.min_count) == ("per_prompt", 32, 16)
    assert build_config(preset="sd15_alignment").reward.name == "llava_bertscore"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: sd15_compressibility\nseed: 7\nsample:\n  num_steps: 30\n")
    cfg = build_config(config_file=path, overrides=["sample.num_steps=10", "train.learning_rate=1e-4"])
    assert cfg.preset == "sd15_compressibility"
    assert (cfg.seed, cfg.sample.num_steps, cfg.train.learning_rate) == (7, 10, 1e-4)
    assert cfg.sample.resolution == 512  # from the preset
    assert DDPOConfig.model_validate(cfg.to_dict()) == cfg  # the resolved dict round-trips


def test_reward_weights(tmp_path):
    cfg = build_config(overrides=["reward.name=null", "reward.weights={jpeg_compressibility: 1.0, aesthetic: 0.1}"])
    assert cfg.reward.components() == {"jpeg_compressibility": 1.0, "aesthetic": 0.1}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["sample.num_stepz=3"], "sample.num_stepz"),             # unknown key
        (["bogus=1"], "bogus"),
        (["sample.num_steps=many"], "sample.num_steps"),          # wrong type
        (["train.timestep_fraction=0"], "train.timestep_fraction"),
        (["train.timestep_fraction=1.5"], "train.timestep_fraction"),
        (["train.batch_size=128"], "train.batch_size=128"),         # larger than the epoch
        (["train.gradient_accumulation_steps=3"], "train.gradient_accumulation_steps=3"),
        (["eval.eta=1.5"], "eval.eta"),
        (["train.lr_schedule=linear"], "train.lr_schedule"),
        (["advantage.mode=group", "sample.samples_per_prompt=1"], "sample.samples_per_prompt"),
        (["advantage.min_count=20"], "min_count=20"),
        (["sample.eta=0"], "sample.eta"),
        (["sample.resolution=65"], "resolution=65"),
        (["reward.name=nice_pictures"], "nice_pictures"),
        (["reward.weights={jpeg_compressibility: 1}"], "exactly one of reward.name or reward.weights"),
        (["prompts.name=everything"], "everything"),
        (["cluster.learner_workers=3"], "cluster.learner_workers=3"),
        (["model.mixed_precision=fp8"], "model.mixed_precision"),
        # Values that were accepted and failed late, or never (issue 15, item 13).
        (["model.pretrained=/no/such/model"], "model.pretrained: '/no/such/model' is a local path but no such directory"),
        (["model.pretrained=./models/missing"], "model.pretrained"),
        (["train.learning_rate=.inf"], "train.learning_rate: Input should be a finite number"),
        (["train.clip_range=.nan"], "train.clip_range: Input should be a finite number"),
        (["eval.guard_margin=.inf"], "eval.guard_margin: inf is refused (NaN/inf are, in every float); use null"),
        (["reward.timeout_s=.inf"], "reward.timeout_s: Input should be a finite number"),
        (["reward.name=null", "reward.weights={jpeg_compressibility: .nan}"], "reward.weights.jpeg_compressibility"),
        (["reward.name=null", "reward.weights={jpeg_compressibility: -.inf}"], "reward.weights.jpeg_compressibility"),
        (["cluster.sampler_resources={sampler_node: -1}"], "cluster.sampler_resources: every amount must be > 0"),
        (["cluster.gpus_per_learner_worker=-0.5"], "cluster.gpus_per_learner_worker"),
        (["seed=-1"], "seed"),
        (["seed=100000000000000000000000"], "seed: Input should be less than or equal to 4294967295"),
        (["run_name=../elsewhere"], "run_name: '../elsewhere' is not a safe directory name"),
        (["run_name=a/b"], "run_name"),
        (["run_name=.."], "run_name"),
        (['run_name="two\\nlines"'], "run_name"),
        (["output_dir=''"], "output_dir"),
        (["output_dir='  '"], "output_dir"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        build_config(overrides=overrides)
    assert field in str(info.value)


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        build_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(config_file=bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(config_file=listy)
    with pytest.raises(ConfigError, match="key.path=value"):
        build_config(overrides=["sample.num_steps"])
    with pytest.raises(ConfigError, match="seed: Input should be a valid integer"):
        build_config(overrides=["seed.x=1"])
    with pytest.raises(ConfigError, match="preset='nope'"):
        build_config(preset="nope")


def test_default_run_names_do_not_collide_within_a_second():
    cfg = DDPOConfig()
    names = {cfg.resolved_run_name() for _ in range(50)}
    assert len(names) == 50
    assert all(name.startswith("tiny-") for name in names)


def test_good_values_near_the_new_limits_pass(tmp_path):
    (tmp_path / "model").mkdir()
    cfg = build_config(overrides=["seed=4294967295", "run_name=sd15-aesthetic_v2.1", "model.pretrained=org/name",
                                  f"model.pretrained={tmp_path / 'model'}", "cluster.sampler_resources={node: 0.5}"])
    assert cfg.seed == 2**32 - 1 and cfg.run_name == "sd15-aesthetic_v2.1"
    assert build_config(overrides=["eval.guard_margin=null"]).eval.guard_margin is None  # record, never stop


def test_a_null_guard_margin_records_the_guard_and_never_stops():
    """What eval.guard_margin=.inf meant before NaN/inf were refused (the benches' 'record, never stop')."""
    from ddpo_ray.training.evaluation import EvalTracker

    cfg = build_config(overrides=["eval.rewards=[aesthetic]", "eval.guard_reward=aesthetic", "eval.guard_margin=null"])
    tracker = EvalTracker.for_config(cfg)
    out = [tracker.update(v, {"eval_reward_mean": r, "eval_aesthetic_mean": g})
           for v, (r, g) in enumerate([(-3.0, 5.0), (-2.0, 1.0), (-1.0, -100.0)])]
    assert [o["eval_guard_stop"] for o in out] == [False, False, False] and not tracker.stopped
    assert out[-1]["eval_guard_drop"] == pytest.approx(105.0) and out[-1]["eval_best_version"] == 2


def test_torch_threads_use_the_cores_of_the_phase_that_runs():
    """At staleness 0 sampling and training alternate: each may use the node's cores (issue 16)."""
    alternating = build_config(overrides=["cluster.num_samplers=1", "cluster.learner_workers=1"]).cluster
    assert alternating.torch_threads == "auto"
    assert alternating.torch_threads_for(reserved_cpus=1.0, node_cores=2) == 2
    assert alternating.torch_threads_for(reserved_cpus=1.0, node_cores=16) == 16
    shared = build_config(overrides=["cluster.num_samplers=4", "cluster.learner_workers=2", "train.batch_size=16"]).cluster
    assert shared.torch_threads_for(reserved_cpus=1.0, node_cores=16) == 4  # four samplers sample at once
    assert shared.torch_threads_for(reserved_cpus=6.0, node_cores=16) == 6  # never below the reservation
    overlapped = build_config(overrides=["cluster.staleness=1"]).cluster
    assert overlapped.torch_threads_for(reserved_cpus=1.5, node_cores=2) == 1  # phases at once: the share
    fixed = build_config(overrides=["cluster.torch_threads=3", "cluster.staleness=1"]).cluster
    assert fixed.torch_threads_for(reserved_cpus=1.0, node_cores=2) == 3
    reserved = build_config(overrides=["cluster.torch_threads=reserved"]).cluster
    assert reserved.torch_threads_for(reserved_cpus=2.0, node_cores=8) == 2
    with pytest.raises(ConfigError, match="torch_threads='alternating' needs cluster.staleness=0"):
        build_config(overrides=["cluster.torch_threads=alternating", "cluster.staleness=1"])
    with pytest.raises(ConfigError, match="torch_threads"):
        build_config(overrides=["cluster.torch_threads=0"])
