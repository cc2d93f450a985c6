"""DDPO learns on the offline `tiny` model: the JPEG rewards beat the base model on the same noise.

The single-process loop with the `tiny_compressibility` / `tiny_incompressibility` presets'
recipe at 32 samples per epoch (the presets sample 64; 4 prompts x 8 here, each prompt's 8
samples a binary tree over the first 3 of 5 denoising steps with per-step advantages, one
full-batch Adam step per epoch at lr 1e-2 falling to 1e-3, clip 1e-2, each step's loss divided
by its score scale), 12 epochs, against a paired baseline: the base model (policy version 0)
sampling each epoch's prompts with the same noise, through the same `LocalBackend.sample`, so
the per-epoch difference is the learning alone.

The recipe is chaotic: one trajectory's path depends on floating-point detail (with the older
group-advantage recipe the same seed rose to 3.22 kB by epoch 9 and fell back to the base value
by epoch 12 on one machine, not on another), so the test asks a statistic over epochs, not a
single trajectory crossing a line: the paired gain, averaged over any 3 consecutive epochs, must
somewhere exceed half the epoch-0 spread. Measured at 1 and 2 torch threads before keeping it
(seed 0, in epoch-0 spreads; the figures are printed with -s and in any failure):
compressibility +2.74 at 1 thread and +2.46 at 2, incompressibility +4.79 and +4.14 (with the
steps after the last branch skipped in training; computing them, +2.28/+2.33 and +4.37/+5.19),
so the floor of 0.5 is a fifth of what was measured. (With group advantages instead of the tree:
compressibility +1.53 and +1.54; incompressibility +0.57 at 2 threads, too little margin to test.)
Why learning on `tiny` is erratic without the tree (the gradient of 32 samples is mostly noise)
is in the README, "Learning on tiny"; `bench/learning.py` measures every task over seeds 0-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpo_ray.config import build_config
from ddpo_ray.prompts import PromptSampler, get_prompts
from ddpo_ray.training.local_loop import LocalBackend, run_local

pytestmark = pytest.mark.slow

# The presets' training as it is; no evaluation (so no guard), to measure the training reward alone.
# The test keeps the 32-sample epoch it was measured with (the presets now sample 64: twice the
# time, for a learning test that only asks "clearly above the base model").
RECIPE = ["seed=0", "num_epochs=12", "save_freq=0", "metrics=false", "eval.every=0", "eval.guard_reward=null",
          "sample.num_batches_per_epoch=4", "train.batch_size=32"]
MIN_GAIN_IN_SPREADS = 0.5  # the best 3-epoch mean of the paired gain, in epoch-0 spreads
WINDOW = 3


def base_model_rewards(cfg) -> np.ndarray:
    """Mean reward per epoch of the untrained policy on each epoch's prompts and noise."""
    backend = LocalBackend(cfg)
    backend.start(run_dir=None, first_epoch=0, resume_path=None)
    prompts = PromptSampler(get_prompts(cfg.prompts.name), cfg.sample.samples_per_prompt, cfg.seed)
    try:
        return np.array([
            backend.sample(epoch, prompts.epoch_prompts(epoch, cfg.samples_per_epoch), 0).rewards.mean()
            for epoch in range(cfg.num_epochs)
        ])
    finally:
        backend.close()


@pytest.mark.parametrize("reward", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_reward_beats_the_base_model_on_the_same_noise(reward, tmp_path):
    cfg = build_config("tiny_" + reward.removeprefix("jpeg_"),
                       overrides=[*RECIPE, f"output_dir={tmp_path}", "run_name=learn"])
    history = run_local(cfg)
    trained = np.array([m["reward_mean"] for m in history])
    baseline = base_model_rewards(cfg)
    spread = history[0]["reward_std"]
    gains = (trained - baseline) / spread
    best = float(np.convolve(gains[1:], np.ones(WINDOW) / WINDOW, mode="valid").max())
    print(f"{reward} at {torch.get_num_threads()} threads: best {WINDOW}-epoch mean gain {best:+.2f} epoch-0 spreads; "
          f"per epoch {np.round(gains, 2).tolist()}")
    np.testing.assert_allclose(trained[0], baseline[0], rtol=1e-6, err_msg="epoch 0 is sampled before any update")
    assert best > MIN_GAIN_IN_SPREADS, (
        f"{reward} at {torch.get_num_threads()} torch threads: best {WINDOW}-epoch mean gain over the base model "
        f"{best:+.2f} epoch-0 spreads ({spread:.4f}); per epoch trained {np.round(trained, 3).tolist()}, "
        f"base {np.round(baseline, 3).tolist()}"
    )
