"""Weight broadcast and the pure rules around the distributed loop: transport, staleness, shards.

The sync test uses the real object-store transport and a real `Sampler` (in this process, with
its real reward client to the session's Serve JPEG app): after a sync the sampler's outputs
change, its LoRA equals the learner's bit for bit, and it samples exactly what the learner's
own pipeline samples with those weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from ddpo_ray.config import build_config
from ddpo_ray.distributed.sampler import Sampler, SampleTask
from ddpo_ray.distributed.weight_transport import (
    INITIAL_POLICY,
    InProcessTransport,
    ObjectStoreTransport,
    PolicyWeights,
)
from ddpo_ray.maths.sharding import split_epoch
from ddpo_ray.maths.staleness import epochs_awaiting_training, sampling_version
from ddpo_ray.models.lora import trainable_parameters, trainable_state_dict
from ddpo_ray.models.merged_lora import MergedLora
from ddpo_ray.models.pipelines import load_pipeline
from ddpo_ray.training.steps import sample_batch
from tests.helpers import PLAIN, randomize_lora


@pytest.mark.ray
def test_sampler_outputs_change_after_a_sync_and_match_the_learner_exactly(reward_apps):
    cfg = build_config(overrides=[*PLAIN, "sample.num_steps=4", "sample.batch_size=2"])
    transport = ObjectStoreTransport()
    learner = load_pipeline(cfg.model, seed=cfg.seed)
    trainable_parameters(learner.unet, True, cfg.model.lora_rank, seed=cfg.seed)
    v0 = transport.publish(trainable_state_dict(learner.unet, True), version=0)
    randomize_lora(learner.unet, std=0.2)  # stands in for a PPO update
    v1 = transport.publish(trainable_state_dict(learner.unet, True), version=1)
    assert isinstance(v1.payload[0], ray.ObjectRef) and v1.num_bytes > 0

    sampler = Sampler(cfg, sampler_id=0, transport=transport)
    task = SampleTask(epoch=0, batch_index=0, prompts=("a red circle", "two blue squares"))
    before = sampler.sample(task, v0)
    images_before = sampler.rewards(task, timeout_s=60).images
    after = sampler.sample(task, v1)
    scored = sampler.rewards(task, timeout_s=60)
    assert scored.policy_version == 1 and after.policy_versions.tolist() == [1, 1]
    assert not torch.equal(before.log_probs, after.log_probs)
    assert not np.array_equal(images_before, scored.images)

    learner_lora = trainable_state_dict(learner.unet, True)
    sampler_lora = trainable_state_dict(sampler.pipe.unet, True)
    assert learner_lora.keys() == sampler_lora.keys()
    assert all(torch.equal(learner_lora[k], sampler_lora[k]) for k in learner_lora)
    # Samplers roll out with the LoRA merged (models/merged_lora.py): the same weights, merged
    # the same way, give the same rollout bit for bit; unmerged, the same log-probs up to rounding.
    with MergedLora.for_sampling(learner.unet, True, cfg.sample.merge_lora).merged_for_sampling():
        reference = sample_batch(learner, cfg, task.prompts, 0, 0, policy_version=1)
    unmerged = sample_batch(learner, cfg, task.prompts, 0, 0, policy_version=1)
    assert (unmerged.log_probs - after.log_probs).abs().max() < 1e-5
    assert torch.equal(reference.next_latents, after.next_latents)
    assert torch.equal(reference.log_probs, after.log_probs)
    assert np.array_equal(reference.images.numpy(), scored.images)


@pytest.mark.ray
def test_a_fresh_samplers_own_adapter_is_the_learners_version_0(reward_apps):
    """A fresh run samples epoch 0 with INITIAL_POLICY, before the learner has published anything
    (issue 16's fast start): the same rollout, bit for bit, as with the learner's published v0."""
    cfg = build_config(overrides=[*PLAIN, "sample.num_steps=4", "sample.batch_size=2"])
    transport = ObjectStoreTransport()
    learner = load_pipeline(cfg.model, seed=cfg.seed)
    trainable_parameters(learner.unet, True, cfg.model.lora_rank, seed=cfg.seed)
    v0 = transport.publish(trainable_state_dict(learner.unet, True), version=0)
    task = SampleTask(epoch=0, batch_index=0, prompts=("a red circle", "two blue squares"))
    own, sent = Sampler(cfg, sampler_id=0, transport=transport), Sampler(cfg, sampler_id=1, transport=transport)
    mine, theirs = own.sample(task, INITIAL_POLICY), sent.sample(task, v0)
    assert own.rewards(task, timeout_s=60).policy_version == 0 and sent.rewards(task, timeout_s=60).policy_version == 0
    assert torch.equal(mine.next_latents, theirs.next_latents) and torch.equal(mine.log_probs, theirs.log_probs)
    own_lora, learner_lora = trainable_state_dict(own.pipe.unet, True), trainable_state_dict(learner.unet, True)
    assert all(torch.equal(own_lora[k], learner_lora[k]) for k in learner_lora)

    randomize_lora(learner.unet, std=0.2)
    own.sample(task, transport.publish(trainable_state_dict(learner.unet, True), version=1))
    own.rewards(task, timeout_s=60)
    with pytest.raises(RuntimeError, match="holds policy v1; the initial policy is only its own starting adapter"):
        own.apply_weights(INITIAL_POLICY)


def test_in_process_transport_round_trip():
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    weights = InProcessTransport().publish(state, version=3)
    state["a"].add_(1)  # the published copy is independent of later training
    fetched = InProcessTransport().fetch(weights)
    assert weights.version == 3 and weights.num_bytes == 32
    assert torch.equal(fetched["a"], torch.arange(4.0))


def test_object_store_transport_rejects_a_foreign_payload():
    with pytest.raises(ValueError, match="expected the 1-tuple"):
        ObjectStoreTransport().fetch(PolicyWeights(version=1, num_bytes=0, payload={"a": 1}))


@pytest.mark.parametrize(
    "staleness, expected", [(0, [0, 1, 2, 3]), (1, [0, 0, 1, 2])]
)
def test_sampling_version_follows_the_staleness(staleness, expected):
    assert [sampling_version(e, staleness) for e in range(4)] == expected


def test_resumed_runs_never_sample_older_than_their_checkpoint():
    assert sampling_version(5, 1, first_version=5) == 5


def test_staleness_bounds_the_epochs_awaiting_training():
    assert epochs_awaiting_training(0) == 0 and epochs_awaiting_training(1) == 1
    with pytest.raises(ValueError, match="staleness=-1"):
        epochs_awaiting_training(-1)


def test_split_epoch_cuts_batches_into_equal_contiguous_shards():
    batches = [("ref0", 4), ("ref1", 4), ("ref2", 4)]
    advantages = np.arange(12, dtype=np.float64)
    shards = split_epoch(batches, advantages, num_workers=2, epoch=7)
    assert [s.parts for s in shards] == [[("ref0", 0, 4), ("ref1", 0, 2)], [("ref1", 2, 4), ("ref2", 0, 4)]]
    np.testing.assert_array_equal(np.concatenate([s.advantages for s in shards]), advantages)
    assert all(s.num_samples == 6 and s.epoch == 7 for s in shards)
    with pytest.raises(ValueError, match="do not split over 5 learner workers"):
        split_epoch(batches, advantages, num_workers=5, epoch=7)
    with pytest.raises(ValueError, match="11 advantages for 12 samples"):
        split_epoch(batches, advantages[:11], num_workers=2, epoch=7)
