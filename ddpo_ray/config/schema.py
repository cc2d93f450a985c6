"""The one run configuration as pydantic models: every field, its default and its checks.

Every default lives here. A config is built as
    defaults <- preset <- YAML file (--config) <- command-line overrides (key.path=value)
and validated in full (types, ranges, cross-field arithmetic) before anything else runs, so a
typo fails in a second instead of after the cluster has started. Names follow ddpo-pytorch
(`sample.num_batches_per_epoch`, `train.timestep_fraction`, ...) so its users feel at home.
"""

from __future__ import annotations

import math
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ddpo_ray.infra.prompt_names import PROMPT_SET_NAMES, TINY_WORLD_PROMPT_SETS
from ddpo_ray.infra.reward_names import REWARD_NAMES
from ddpo_ray.infra.torch_thread import assigned_cpus, node_cores
from ddpo_ray.maths.advantages import GROUP_MODES
from ddpo_ray.maths.branching import tree_depth


# Experiment trackers `trackers` may name, each the pip extra that installs it
# (ddpo_ray.records.trackers). MLflow is left out: its client pulls ~30 packages (pyarrow,
# SQLAlchemy, Flask, ...), too heavy for an optional logger.
TRACKER_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every bad field."""


# model.pretrained values that are built in code, not loaded.
BUILTIN_MODELS = ("tiny", "tiny-random", "sd15-random")
SEED_MAX = 2**32 - 1  # numpy's seed range


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default). NaN and inf
    # are refused in every float (learning rate, clip range, timeouts, weights, ...): each one
    # either breaks training silently or turns a bounded wait into an endless one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _looks_like_local_path(name: str) -> bool:
    """A Hugging Face id is `name` or `org/name`; anything else path-shaped is meant as a directory."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


class ModelConfig(_Section):
    pretrained: str = Field(
        "tiny",
        description='"tiny" (built in, offline), "sd15-random" (SD1.5 architecture, random '
        "init, for GPU timings), a Hugging Face id, or a local diffusers directory",
    )
    revision: str | None = None

    @field_validator("pretrained")
    @classmethod
    def _local_model_exists(cls, value: str) -> str:
        # Fail here, not inside the actors after Ray and Serve are up.
        if value not in BUILTIN_MODELS and _looks_like_local_path(value) and not Path(value).expanduser().is_dir():
            raise ValueError(
                f"{value!r} is a local path but no such directory exists; expected a diffusers model "
                f"directory, a Hugging Face id (org/name), or one of {list(BUILTIN_MODELS)}"
            )
        return value

    use_lora: bool = True
    lora_rank: int = Field(4, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="dtype of the frozen weights and autocast; LoRA weights stay fp32"
    )


class SampleConfig(_Section):
    num_steps: int = Field(20, ge=1)
    eta: float = Field(1.0, gt=0.0, le=1.0, description="DDIM stochasticity; 0 has no log-density")
    guidance_scale: float = Field(5.0, ge=1.0, description="CFG weight; 1.0 turns CFG off")
    resolution: int = Field(64, ge=8)
    batch_size: int = Field(8, ge=1, description="images per sampler call")
    num_batches_per_epoch: int = Field(4, ge=1, description="in total, spread over samplers")
    samples_per_prompt: int = Field(1, ge=1, description="K samples of each prompt per epoch")
    initial_noise: Literal["per_sample", "per_group", "tree"] = Field(
        "per_sample", description="per_group: the K samples of a prompt start from one shared x_T "
        "and differ only in their step noise, so group advantages no longer carry the reward "
        "variance x_T sets, which no action explains (ddpo_ray.training.steps.group_initial_noise); "
        "tree: they also split in two at each of the first log2(K) steps, a binary tree whose "
        "nodes share their noise, so each branching step gets its own advantage "
        "(advantage.mode: tree; ddpo_ray.maths.branching)"
    )
    merge_lora: bool = Field(
        True, description="roll out with the LoRA merged into the base weights (fp32 UNets only; "
        "the speed of the adapter-free UNet, the same policy up to rounding)"
    )

    @model_validator(mode="after")
    def _resolution_multiple_of_8(self) -> "SampleConfig":
        if self.resolution % 8 != 0:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 8")
        return self


class TrainConfig(_Section):
    learning_rate: float = Field(3e-4, gt=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_weight_decay: float = Field(1e-4, ge=0.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    batch_size: int = Field(8, ge=1, description="samples per minibatch, per learner worker")
    gradient_accumulation_steps: int = Field(1, ge=1, description="minibatches per optimizer step")
    micro_batch_size: int | None = Field(
        None, ge=1, description="at most this many samples per UNet forward and backward: a larger "
        "minibatch is computed in chunks whose gradients add up to the minibatch's (memory, not maths: "
        "the same update up to float rounding); None: the whole minibatch at once",
    )
    num_inner_epochs: int = Field(1, ge=1)
    cfg: bool = Field(True, description="recompute log-probs with the same CFG as sampling")
    clip_range: float = Field(1e-4, gt=0.0)
    adv_clip_max: float = Field(5.0, gt=0.0)
    timestep_fraction: float = Field(1.0, gt=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    algorithm: Literal["ddpo_is", "ddpo_sf"] = Field(
        "ddpo_is",
        description="ddpo_is: clipped importance ratio (PPO); ddpo_sf: score function, one "
        "optimizer step per epoch",
    )
    kl_coef: float = Field(
        0.0, ge=0.0, description="weight of the per-step KL to the reference policy (LoRA off); 0: none"
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="cosine: the learning rate falls from learning_rate (epoch 0) to "
        "lr_final_fraction x learning_rate (the last epoch), so the last updates are small",
    )
    lr_final_fraction: float = Field(0.1, ge=0.0, le=1.0, description="cosine: the last epoch's share of learning_rate")
    step_weighting: Literal["uniform", "score_scale"] = Field(
        "uniform",
        description="uniform: every denoising step's loss counts alike (DDPO); score_scale: each "
        "step's loss is divided by the scale of its log-prob gradient (|d mean / d model output| "
        "/ std, from the schedule), so low-noise steps, whose 1/std-sized scores are mostly noise, "
        "do not drown out the rest",
    )
    recompute_old_log_probs: bool | None = Field(
        None,
        description="score the stored steps with the learner's own kernels before the first update and "
        "use those as PPO's old log-probs (bf16/fp16 sampling and training round differently, by about "
        "the clip range); None: on with mixed precision at cluster.staleness 0, else off",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the UNet's activations in the backward: less memory, ~30% more time"
    )


class AdvantageConfig(_Section):
    mode: Literal["per_prompt", "group", "group_centred", "batch", "tree"] = Field(
        "batch", description="ddpo_ray.maths.advantages: per_prompt (DDPO's tracker), group (standardised "
        "within a prompt's K samples), group_centred (minus the group mean, one scale per epoch), batch, "
        "tree (per denoising step, child minus parent subtree mean; needs sample.initial_noise: tree)"
    )
    buffer_size: int = Field(16, ge=1, description="per_prompt: rewards kept per prompt")
    min_count: int = Field(16, ge=1, description="per_prompt: below this, use batch stats")

    @model_validator(mode="after")
    def _min_count_fits_buffer(self) -> "AdvantageConfig":
        if self.min_count > self.buffer_size:
            raise ValueError(
                f"min_count={self.min_count} can never be reached with buffer_size="
                f"{self.buffer_size}; set min_count <= buffer_size"
            )
        return self


class PromptsConfig(_Section):
    name: str = "tiny_shapes"
    eval_name: str = Field("tiny_shapes_held_out", description="held-out prompts for evaluation")

    @model_validator(mode="after")
    def _known_sets(self) -> "PromptsConfig":
        for field in ("name", "eval_name"):
            value = getattr(self, field)
            if value not in PROMPT_SET_NAMES:
                raise ValueError(
                    f"{field}={value!r} is not a prompt set; expected one of {sorted(PROMPT_SET_NAMES)}"
                )
        return self


class RewardConfig(_Section):
    name: str | None = "jpeg_compressibility"
    weights: dict[str, float] | None = Field(
        None, description="a weighted sum {reward_name: weight}; use instead of name"
    )
    timeout_s: float = Field(300.0, gt=0.0, description="a batch's rewards must arrive within this")
    max_retries: int = Field(2, ge=0, description="resends of a batch whose reward replica died")

    @model_validator(mode="after")
    def _one_of_name_or_weights(self) -> "RewardConfig":
        if (self.name is None) == (self.weights is None):
            raise ValueError("set exactly one of reward.name or reward.weights")
        for reward_name in self.components():
            if reward_name not in REWARD_NAMES:
                raise ValueError(f"unknown reward {reward_name!r}; expected one of {list(REWARD_NAMES)}")
        if self.weights is not None and not self.weights:
            raise ValueError("reward.weights is empty; name at least one reward")
        return self

    def components(self) -> dict[str, float]:
        """The rewards to compute and their weights ({name: 1.0} for a single reward)."""
        return {self.name: 1.0} if self.name is not None else dict(self.weights or {})


class EvalConfig(_Section):
    """Held-out evaluation, the over-optimisation guard and `best` checkpoint selection.

    Every `every` epochs (and before the first), the policy generates one image per eval prompt
    from fixed noise with deterministic DDIM (eta 0), scored by the training reward and the
    `rewards` listed here. See ddpo_ray.evaluation.
    """

    every: int = Field(5, ge=0, description="evaluate every N epochs (and before the first); 0: never")
    prompts_per_group: int = Field(4, ge=1, description="prompts taken from each group of the eval set")
    include_train_prompts: bool = Field(True, description="also evaluate on prompts.name (group 'train')")
    batch_size: int = Field(8, ge=1, description="images per generation call")
    num_steps: int | None = Field(None, ge=1, description="DDIM steps; default sample.num_steps")
    eta: float = Field(
        0.0, ge=0.0, le=1.0,
        description="DDIM stochasticity of evaluation: 0 deterministic; > 0 the sampling policy, "
        "its per-step noise fixed per eval image",
    )
    rewards: list[str] = Field(default_factory=list, description="extra rewards scored on the eval images")
    guard_reward: str | None = Field(
        None, description="a reward that must not fall (over-optimisation guard); scored on eval images"
    )
    guard_margin: float | None = Field(
        0.0, ge=0.0,
        description="stop when the guard's eval mean falls more than this below its best so far; null: "
        "record the guard's fall, never stop on it",
    )
    best_metric: str = Field(
        "eval_reward_mean", description="eval key whose maximum picks the `best` checkpoint"
    )

    @field_validator("guard_margin", mode="before")
    @classmethod
    def _finite_margin(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} is refused (NaN/inf are, in every float); use null to record the guard "
                             "without ever stopping on it")
        return value

    @model_validator(mode="after")
    def _known_rewards(self) -> "EvalConfig":
        for name in [*self.rewards, *([self.guard_reward] if self.guard_reward else [])]:
            if name not in REWARD_NAMES:
                raise ValueError(f"eval reward {name!r} is unknown; expected one of {list(REWARD_NAMES)}")
        return self


class ClusterConfig(_Section):
    num_samplers: int = Field(1, ge=1)
    gpus_per_sampler: float = Field(0.0, ge=0.0)
    cpus_per_sampler: float = Field(1.0, gt=0.0, description="also its torch threads (at least 1)")
    sampler_resources: dict[str, float] = Field(
        default_factory=dict, description='extra Ray resources per sampler, e.g. {"sampler_node": 1}'
    )
    sampler_max_restarts: int = Field(3, ge=-1, description="-1: restart without limit")
    placement_timeout_s: float = Field(
        900.0, gt=0.0,
        description="the samplers, and the learner's worker group, must be placed and have loaded their "
        "pipelines within this, else the run stops with an error naming what they asked for (an "
        "autoscaler may add nodes meanwhile)",
    )
    learner_workers: int = Field(1, ge=1)
    gpus_per_learner_worker: float = Field(0.0, ge=0.0)
    cpus_per_learner_worker: float = Field(1.0, gt=0.0, description="also its torch threads (at least 1)")
    learner_max_failures: int = Field(2, ge=-1, description="worker-group restarts (Ray Train FailureConfig)")
    learner_timeout_s: float = Field(
        3600.0, gt=0.0,
        description="the driver waits at most this for the learner's next policy version or checkpoint "
        "(one epoch's training, plus start-up and placement for the first), then stops with an error",
    )
    staleness: int = Field(0, ge=0, le=1, description="0: exact DDPO; 1: sample while training")
    torch_threads: Literal["auto", "reserved", "alternating"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="torch threads of each sampler and learner worker. reserved: the CPUs it reserved; "
        "alternating: at staleness 0 sampling and training take turns, so each uses its node's cores "
        "divided by max(num_samplers, learner_workers) (at least what it reserved); auto: alternating at "
        "staleness 0, else reserved; N: N threads",
    )
    @field_validator("sampler_resources")
    @classmethod
    def _positive_resources(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: amount for name, amount in value.items() if not amount > 0}
        if bad:
            raise ValueError(f"every amount must be > 0 (a Ray resource request), got {bad}")
        return value

    @model_validator(mode="after")
    def _threads_fit_staleness(self) -> "ClusterConfig":
        if self.torch_threads == "alternating" and self.staleness != 0:
            raise ValueError(
                "cluster.torch_threads='alternating' needs cluster.staleness=0 (at staleness 1 sampling and "
                "training run at once, and threads beyond the CPU share slow both); use 'auto' or 'reserved'"
            )
        return self

    def torch_threads_for(self, reserved_cpus: float, node_cores: int) -> int:
        """Torch threads of a sampler or learner worker that reserved `reserved_cpus` on a node
        with `node_cores` cores (see `torch_threads`).

        Measured on 2 cores (issue 16): with one thread each, at staleness 0 the sampler and the
        learner each idle one core while the other phase runs, since the phases alternate.
        At staleness 1 they run at once, and threads beyond the CPU share slow both.
        """
        reserved = max(1, math.floor(reserved_cpus))
        mode = self.torch_threads
        if isinstance(mode, int):
            return mode
        if mode == "auto":
            mode = "alternating" if self.staleness == 0 else "reserved"
        if mode == "reserved":
            return reserved
        return max(reserved, node_cores // max(self.num_samplers, self.learner_workers))

    def torch_threads_here(self) -> int:
        """`torch_threads_for` the calling actor: the CPUs Ray reserved for it, its node's cores."""
        return self.torch_threads_for(assigned_cpus(), node_cores())

    weight_transport: Literal["object_store"] = Field(
        "object_store",
        description="how the learner's weights reach the samplers (ddpo_ray.distributed.weight_transport)",
    )


class DDPOConfig(_Section):
    preset: str = "tiny"
    run_name: str | None = Field(None, description="default: <preset>-<date>-<time>-<random hex>")
    output_dir: str = Field("outputs", min_length=1)
    storage_uri: str | None = Field(
        None,
        description="also keep the run at <storage_uri>/<run_name>/ (s3://, gs://, hdfs://, abfs://, file://): "
        "mirrored after every checkpoint and at the end, fetched by resume_from=latest when the run directory "
        "is missing here (ddpo_ray.records.storage)",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX)
    num_epochs: int = Field(5, ge=1)
    save_freq: int = Field(1, ge=0, description="checkpoint every N epochs (0: only at the end)")
    keep_last_n: int = Field(
        3, ge=0,
        description="epoch checkpoints kept: the newest N complete ones, older ones are deleted (0: keep all); "
        "checkpoints/best is never deleted",
    )
    resume_from: str | None = Field(None, description='a checkpoint dir, a run dir, or "latest"')
    metrics: bool = Field(True, description="export the ddpo_* Prometheus metrics (see ddpo_ray.records.metrics)")
    trackers: list[str] = Field(
        default_factory=list,
        description='experiment trackers that also get the epoch scalars and grids: "tensorboard" '
        '(event files in <run>/tensorboard), "wandb" (W&B; offline without an API key)',
    )
    model: ModelConfig = ModelConfig()
    sample: SampleConfig = SampleConfig()
    train: TrainConfig = TrainConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    prompts: PromptsConfig = PromptsConfig()
    reward: RewardConfig = RewardConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()

    @property
    def samples_per_epoch(self) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch

    def eval_reward_names(self) -> list[str]:
        """Rewards scored on eval images: the training components, eval.rewards, the guard."""
        names = list(self.reward.components())
        for name in [*self.eval.rewards, *([self.eval.guard_reward] if self.eval.guard_reward else [])]:
            if name not in names:
                names.append(name)
        return names

    def eval_reward_weights(self) -> dict[str, float]:
        """Every eval reward at weight 1: evaluation scores each one on its own."""
        return {name: 1.0 for name in self.eval_reward_names()}

    def eval_metric_keys(self) -> list[str]:
        """The keys an evaluation writes (and `eval.best_metric` may name)."""
        keys = ["eval_reward_mean"]
        keys += [f"eval_{name}_mean" for name in self.eval_reward_names()]
        return keys

    @property
    def recompute_old_log_probs(self) -> bool:
        """train.recompute_old_log_probs resolved: unset means on with mixed precision at staleness 0."""
        if self.train.recompute_old_log_probs is not None:
            return self.train.recompute_old_log_probs
        return self.model.mixed_precision != "no" and self.cluster.staleness == 0

    @property
    def num_train_timesteps(self) -> int:
        """Denoising steps trained per sample (the first int(num_steps * fraction) of a shuffle)."""
        return int(self.sample.num_steps * self.train.timestep_fraction)

    @field_validator("run_name")
    @classmethod
    def _one_path_component(cls, value: str | None) -> str | None:
        # The run directory is output_dir/run_name: a name must not climb out of it or nest.
        if value is None:
            return value
        if value in ("", ".", "..") or "/" in value or "\\" in value or not value.isprintable() or value != value.strip():
            raise ValueError(
                f"{value!r} is not a safe directory name; expected one path component: no '/', '\\', "
                "control characters (newlines), surrounding spaces, and not '.' or '..'"
            )
        return value

    @field_validator("storage_uri")
    @classmethod
    def _storage_uri_parses(cls, value: str | None) -> str | None:
        from ddpo_ray.records.storage import check_storage_uri

        return value if value is None else check_storage_uri(value)

    @field_validator("output_dir")
    @classmethod
    def _output_dir_named(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError(f"{value!r}: expected a directory path (not blank, no control characters)")
        return value

    @model_validator(mode="after")
    def _known_trackers(self) -> "DDPOConfig":
        unknown = [name for name in self.trackers if name not in TRACKER_EXTRAS]
        if unknown:
            raise ValueError(f"trackers: unknown {unknown}; expected any of {list(TRACKER_EXTRAS)}")
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"trackers: {self.trackers} names a tracker twice")
        return self

    @model_validator(mode="after")
    def _gold_reads_tiny_prompts(self) -> "DDPOConfig":
        if "alignment_gold" not in self.eval_reward_names():
            return self
        fields = {"prompts.name": self.prompts.name}
        if self.eval.every:
            fields["prompts.eval_name"] = self.prompts.eval_name
        for field, name in fields.items():
            if name not in TINY_WORLD_PROMPT_SETS:
                raise ValueError(
                    f"{field}={name!r}: alignment_gold reads tiny-world prompts only; expected one of "
                    f"{list(TINY_WORLD_PROMPT_SETS)}"
                )
        return self

    @model_validator(mode="after")
    def _epoch_arithmetic(self) -> "DDPOConfig":
        total = self.samples_per_epoch
        workers = self.cluster.learner_workers
        epoch = (
            f"{total} samples per epoch (sample.batch_size {self.sample.batch_size} x "
            f"sample.num_batches_per_epoch {self.sample.num_batches_per_epoch})"
        )
        if total % workers:
            raise ValueError(f"{epoch} do not split evenly over cluster.learner_workers={workers}")
        per_worker = total // workers
        if self.train.batch_size > per_worker:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} is larger than the {per_worker} samples "
                f"each learner worker gets from {epoch}"
            )
        if per_worker % self.train.batch_size:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} does not divide the {per_worker} "
                f"samples each learner worker gets from {epoch}"
            )
        minibatches = per_worker // self.train.batch_size
        if minibatches % self.train.gradient_accumulation_steps:
            raise ValueError(
                f"train.gradient_accumulation_steps={self.train.gradient_accumulation_steps} does "
                f"not divide the {minibatches} minibatches per learner worker per epoch, so the "
                "last optimizer step would be partial"
            )
        if total % self.sample.samples_per_prompt:
            raise ValueError(
                f"sample.samples_per_prompt={self.sample.samples_per_prompt} does not divide {epoch}"
            )
        if self.advantage.mode in GROUP_MODES and self.sample.samples_per_prompt < 2:
            raise ValueError(
                f"advantage.mode={self.advantage.mode!r} normalises within groups of one prompt, so it needs "
                f"sample.samples_per_prompt >= 2 (got {self.sample.samples_per_prompt})"
            )
        if self.advantage.mode == "tree" and self.sample.initial_noise != "tree":
            raise ValueError(
                "advantage.mode='tree' compares the branches of trees of samples; set sample.initial_noise='tree' "
                f"(got {self.sample.initial_noise!r}) or another advantage.mode"
            )
        if self.sample.initial_noise == "tree":
            tree_depth(self.sample.samples_per_prompt, self.sample.num_steps)  # a power of two, <= num_steps
        if self.sample.initial_noise in ("per_group", "tree") and self.advantage.mode not in GROUP_MODES:
            raise ValueError(
                f"sample.initial_noise={self.sample.initial_noise!r} shares noise within a prompt's group, which only "
                f"removes noise from group advantages; set advantage.mode to one of {GROUP_MODES} (got {self.advantage.mode!r})"
            )
        if self.num_train_timesteps < 1:
            raise ValueError(
                f"train.timestep_fraction={self.train.timestep_fraction} x sample.num_steps="
                f"{self.sample.num_steps} trains no timestep; raise one of them"
            )
        if self.train.algorithm == "ddpo_sf":
            steps = minibatches // self.train.gradient_accumulation_steps
            if self.train.num_inner_epochs != 1 or steps != 1:
                raise ValueError(
                    "train.algorithm='ddpo_sf' has no importance ratio, so each epoch's samples may "
                    f"feed exactly one optimizer step; got train.num_inner_epochs="
                    f"{self.train.num_inner_epochs} and {steps} steps per epoch (set num_inner_epochs=1 "
                    f"and train.batch_size x gradient_accumulation_steps = {per_worker})"
                )
        if self.train.algorithm == "ddpo_sf" and self.cluster.staleness != 0:
            raise ValueError(
                "train.algorithm='ddpo_sf' has no importance ratio to correct for samples drawn by an "
                f"older policy; it needs cluster.staleness=0 (got {self.cluster.staleness})"
            )
        if self.train.recompute_old_log_probs and self.cluster.staleness != 0:
            raise ValueError(
                "train.recompute_old_log_probs=true rescores samples with the learner's weights, which at "
                f"cluster.staleness={self.cluster.staleness} are newer than the ones that sampled (the ratio "
                "would lose the correction for the lag); use cluster.staleness=0 or leave it unset"
            )
        if self.train.kl_coef > 0 and not self.model.use_lora:
            raise ValueError(
                "train.kl_coef > 0 needs model.use_lora=true: the reference policy is the UNet with "
                "its LoRA switched off"
            )
        if self.eval.best_metric not in self.eval_metric_keys():
            raise ValueError(
                f"eval.best_metric={self.eval.best_metric!r} is not written by evaluation; expected "
                f"one of {self.eval_metric_keys()}"
            )
        if self.eval.guard_reward is not None and self.eval.every == 0:
            raise ValueError("eval.guard_reward is evaluated on held-out images; set eval.every >= 1")
        return self

    def resolved_run_name(self) -> str:
        """run_name, or a fresh default: <preset>-<date>-<time>-<6 random hex digits>.

        The random suffix keeps two runs started in the same second apart (a second run
        must never land in the first one's directory). Resolve it once per run.
        """
        return self.run_name or f"{self.preset}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
