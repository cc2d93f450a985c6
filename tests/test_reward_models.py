"""The reward models in one process (no Ray): LAION MLP shape, loading paths, BERTScore, LLaVA,
and the replica-side batching and health logic."""

import asyncio

import numpy as np
import pytest
import torch
from torch import nn

from ddpo_ray.infra.hf_loading import RewardModelNotFoundError
from reward_services.aesthetic_model import AestheticMLP, AestheticPredictor, build_tiny_random_clip, load_mlp
from reward_services.bertscore import BertScore
from reward_services.captioner import Captioner, build_tiny_random_llava
from reward_services.functions import llava_bertscore_rewards
from reward_services.registry import REWARD_APPS
from reward_services.runtime import ModelReplica, flatten_call_split
from tests.helpers import sample_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bertscore():
    return BertScore(device="cpu")


@pytest.fixture(scope="module")
def captioner():
    return Captioner(device="cpu")


def test_laion_mlp_layers_are_exact():
    mlp = AestheticMLP()
    layers = list(mlp.layers)
    linear = [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)]
    assert linear == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [m.p for m in layers if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    # Dropout right after each of the first three linears; nothing else (no activations).
    assert [type(m).__name__ for m in layers] == [
        "Linear",
        "Dropout",
        "Linear",
        "Dropout",
        "Linear",
        "Dropout",
        "Linear",
        "Linear",
    ]
    # The released file's keys: layers.{0,2,4,6,7}.{weight,bias}.
    assert sorted(mlp.state_dict()) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    )
    out = mlp.eval()(torch.randn(3, 768))
    assert out.shape == (3, 1)


def test_aesthetic_score_is_the_mlp_of_the_normalised_clip_embedding():
    predictor = AestheticPredictor(device="cpu")
    images = sample_images(3)
    embeddings = predictor.embed(images)
    assert embeddings.shape == (3, 768)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    expected = predictor.mlp(embeddings).squeeze(-1).double().numpy()
    np.testing.assert_allclose(predictor(images), expected, rtol=1e-6)
    assert len(set(np.round(predictor(images), 8))) == 3  # different images, different scores


def test_mlp_weights_file_and_clip_dir_load(tmp_path):
    """Real loading paths: a .pth state dict (the LAION format) and a save_pretrained CLIP dir."""
    reference = AestheticPredictor(clip_model="tiny-random", device="cpu", seed=3)
    weights = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(reference.mlp.state_dict(), weights)
    clip, processor = build_tiny_random_clip(seed=3)
    clip.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    # Seed 0 would build a different random MLP: equal scores prove both files were used.
    loaded = AestheticPredictor(
        clip_model=str(tmp_path / "clip"), mlp_weights=str(weights), device="cpu", seed=0
    )
    images = sample_images(2)
    np.testing.assert_allclose(loaded(images), reference(images), rtol=1e-6)
    assert not np.allclose(AestheticPredictor(clip_model="tiny-random", device="cpu", seed=0)(images), reference(images))
    with pytest.raises(FileNotFoundError, match="mlp_weights='/nope.pth': no such file"):
        load_mlp("/nope.pth")


def test_missing_models_fail_with_a_clear_error(tmp_path):
    with pytest.raises(
        RewardModelNotFoundError, match="clip_model='openai/clip-vit-large-patch14'.*HF_HUB_OFFLINE"
    ):
        AestheticPredictor(clip_model="openai/clip-vit-large-patch14", mlp_weights="/m.pth", device="cpu")
    with pytest.raises(ValueError, match="mlp_weights is required with clip_model='/some/clip'"):
        AestheticPredictor(clip_model="/some/clip", device="cpu")
    with pytest.raises(RewardModelNotFoundError, match="has no config.json"):
        Captioner(model=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="set num_layers"):
        BertScore(model=str(tmp_path), device="cpu")


def test_bertscore_recall_prefers_the_matching_caption(bertscore):
    reference = "The image contains a cat riding a bike"
    precision, recall, f1 = bertscore(
        ["a cat riding a bike", "a bowl of soup on a kitchen table", ""], [reference] * 3
    )
    assert recall[0] > recall[1] + 0.2
    assert f1[0] > f1[1] and precision[0] > precision[1]
    assert (precision[2], recall[2], f1[2]) == (0.0, 0.0, 0.0)  # empty caption: bert-score's rule
    assert 0.0 < recall[1] < recall[0] <= 1.0


def test_tiny_llava_is_deterministic_and_batch_invariant(captioner):
    images = sample_images(3)
    batched = captioner(images)
    assert len(batched) == 3 and all(isinstance(c, str) and c for c in batched)
    assert [captioner(images[i : i + 1])[0] for i in range(3)] == batched
    # Greedy decoding: a shorter budget gives a prefix of the same answer.
    short = Captioner(device="cpu", max_new_tokens=3)(images[:1])[0]
    assert batched[0].startswith(short) and len(short) < len(batched[0])


def test_llava_loads_from_a_saved_dir(tmp_path):
    model, processor = build_tiny_random_llava(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = Captioner(model=str(tmp_path), device="cpu")
    images = sample_images(2)
    assert loaded(images) == Captioner(model="tiny-random", device="cpu", seed=0)(images)


def test_in_process_alignment_reward(captioner, bertscore):
    images = sample_images(2)
    prompts = ["a cat", "a dog riding a bike"]
    rewards, info = llava_bertscore_rewards(captioner, bertscore, images, prompts)
    precision, recall, f1 = bertscore(info["captions"], [f"The image contains {p}" for p in prompts])
    np.testing.assert_array_equal(rewards, recall)
    assert info["bertscore_precision"] == precision.tolist() and info["bertscore_f1"] == f1.tolist()


def test_registry_covers_every_configurable_reward():
    from ddpo_ray.infra.reward_names import REWARD_NAMES

    assert set(REWARD_APPS) == set(REWARD_NAMES)
    for name, spec in REWARD_APPS.items():
        assert spec.app_name == name and spec.route_prefix == f"/{name}" and spec.ingress in spec.deployments


def test_batched_model_calls_split_back_per_request():
    requests = [[1, 2, 3], [4], [5, 6]]
    assert flatten_call_split(lambda chunk: [x * 10 for x in chunk], requests, chunk_size=2) == [
        [10, 20, 30],
        [40],
        [50, 60],
    ]
    with pytest.raises(RuntimeError, match="model returned 1 results for 2 inputs"):
        flatten_call_split(lambda chunk: chunk[:1], requests, chunk_size=2)


def test_replica_reports_unhealthy_after_repeated_model_failures():
    """check_health (what Serve polls) fails after 3 failed model calls in a row, so Serve
    replaces the replica; one success resets the count."""
    replica = ModelReplica()
    replica.setup_replica()

    def broken(batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for _ in range(ModelReplica.MAX_CONSECUTIVE_FAILURES - 1):
        with pytest.raises(RuntimeError):
            asyncio.run(replica.run_model(broken, [[1]]))
    replica.check_health()  # still healthy
    with pytest.raises(RuntimeError):
        asyncio.run(replica.run_model(broken, [[1]]))
    with pytest.raises(RuntimeError, match="3 model calls failed in a row; last: RuntimeError: CUDA error"):
        replica.check_health()
    assert asyncio.run(replica.run_model(lambda batch: batch, [[1], [2]])) == [[1], [2]]
    replica.check_health()
