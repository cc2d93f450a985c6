"""bench/gpu.py is ready before a GPU shows up: its FLOP count is right (hand formulas, torch's own
counter, batch scaling), and its table runs end to end on the
tiny model on the CPU."""

import importlib.util
import json

import pytest
import torch

from tests.helpers import REPO, run_bench_script

SCRIPT = REPO / "bench" / "gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: float):
    return run_bench_script("gpu.py", *args, timeout=timeout)


def test_hook_counts_match_the_hand_formulas():
    from diffusers.models.attention_processor import Attention

    bench = load_bench()
    linear = torch.nn.Linear(16, 24)
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    grouped = torch.nn.Conv2d(8, 8, kernel_size=(3, 1), padding=(1, 0), groups=4)
    attention = Attention(query_dim=32, heads=4, dim_head=8, cross_attention_dim=16)
    with torch.no_grad(), bench.FlopCounter(linear=linear, conv=conv, grouped=grouped, attention=attention) as count:
        linear(torch.randn(2, 5, 16))
        grouped(conv(torch.randn(2, 3, 16, 16)))  # conv's output is (2, 8, 8, 8)
        attention(torch.randn(2, 10, 32), encoder_hidden_states=torch.randn(2, 7, 16))
    assert count.flops("linear") == 2 * (2 * 5) * 16 * 24
    assert count.flops("conv") == 2 * (2 * 8 * 8 * 8) * 3 * 3 * 3
    assert count.flops("grouped") == 2 * (2 * 8 * 8 * 8) * (8 // 4) * 3 * 1
    projections = 2 * 10 * 32 * 32 * 2 + 2 * 7 * 16 * 32 * 2  # to_q and to_out; to_k and to_v on the 7 text tokens
    scores_and_values = 2 * (2 * 10 * 7 * 32)  # Q K^T and A V: batch x 10 queries x 7 keys x inner dim 32
    assert count.flops("attention") == 2 * (projections + scores_and_values)
    assert count.flops(grad=True) == 0  # all under no_grad


def tiny_unet():
    from ddpo_ray.models.pipelines import tiny_unet_and_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, _ = tiny_unet_and_vae()
    return unet.eval()


def unet_inputs(batch: int):
    return torch.randn(batch, 4, 16, 16), torch.full((batch,), 500), torch.randn(batch, 32, 384)


def test_doubling_the_batch_doubles_the_counted_unet_flops():
    bench = load_bench()
    unet = tiny_unet()
    counts = []
    for batch in (1, 2):
        latents, timesteps, text = unet_inputs(batch)
        with torch.no_grad(), bench.FlopCounter(unet=unet) as count:
            unet(latents, timesteps, encoder_hidden_states=text)
        counts.append(count.flops("unet", grad=False))
    assert counts[0] > 1e7
    assert counts[1] == 2 * counts[0]


def test_the_hook_count_equals_torch_flop_counter_on_the_unet():
    # With diffusers' plain AttnProcessor the attention is bmm/baddbmm, which torch's counter sees
    # on the CPU too, so every FLOP the hooks count (convs, linears, attention matmuls) is in both.
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    bench = load_bench()
    unet = tiny_unet()
    unet.set_attn_processor(AttnProcessor())
    latents, timesteps, text = unet_inputs(2)
    with torch.no_grad():
        with bench.FlopCounter(unet=unet) as hooks:
            unet(latents, timesteps, encoder_hidden_states=text)
        with FlopCounterMode(display=False) as reference:
            unet(latents, timesteps, encoder_hidden_states=text)
    assert hooks.flops() == reference.get_total_flops()


def test_peak_table_picks_the_specific_name_first():
    bench = load_bench()
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989
    assert bench.peak_tflops("NVIDIA H100 PCIe", None) == 756
    assert bench.peak_tflops("NVIDIA H200", None) == 989
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312
    assert bench.peak_tflops("NVIDIA L40S", None) == 362
    assert bench.peak_tflops("NVIDIA L4", None) == 121
    assert bench.peak_tflops("Some Future GPU", None) is None
    assert bench.peak_tflops("NVIDIA H100 PCIe", 500.0) == 500.0


@pytest.mark.slow
def test_the_cpu_smoke_run_prints_the_table_and_counts_consistently(tmp_path):
    out = tmp_path / "gpu.json"
    result = run_script("--device", "cpu", "--tiny", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("sampler throughput", "learner throughput", "sampler MFU", "learner peak memory", "sync latency",
                 "elapsed"):
        assert line in result.stdout, line
    figures = json.loads(out.read_text())
    m, f = figures["metrics"], figures["flops"]
    assert set(m) == {
        "sampler_images_per_s", "sampler_tflops", "sampler_mfu", "sampler_peak_memory_gb", "sampler_resident_memory_gb",
        "learner_pairs_per_s", "learner_tflops", "learner_mfu", "learner_peak_memory_gb", "learner_resident_memory_gb",
        "sync_latency_s", "sync_publish_s", "sync_apply_s", "sync_merge_s",
    }
    for key in ("sampler_images_per_s", "sampler_tflops", "learner_pairs_per_s", "learner_tflops"):
        assert m[key] > 0, key
    for key in ("sampler_mfu", "learner_mfu", "sampler_peak_memory_gb", "learner_peak_memory_gb"):
        assert m[key] is None, key  # n/a on the CPU
    assert figures["merged_sampling"]  # fp32 on the CPU: the sampler merges, so the sync re-merges
    for key in ("sync_publish_s", "sync_apply_s", "sync_merge_s"):
        assert 0 < m[key] <= m["sync_latency_s"] * 1.5, key
    batch, steps = figures["batch"], figures["steps"]
    # Sampling ran `steps` CFG UNet calls of 2 x batch rows, exactly as one counted call predicts.
    assert f["sampling_unet_per_image"] * batch == steps * f["unet_cfg_forward_sampling_batch"]
    # Prompts are encoded once each (in the warm-up), so an image's FLOPs are its UNet's and VAE's.
    assert f["sampling_per_image"] == f["sampling_unet_per_image"] + f["sampling_vae_per_image"]
    assert f["sampling_vae_per_image"] > 0 and f["text_per_new_prompt"] > 0
    # Training forwards with CFG: one pair is two UNet rows, as one sampled image's step is (plus the
    # unmerged LoRA's few FLOPs); without CFG this ratio would be 0.5.
    per_row_step = f["unet_cfg_forward_sampling_batch"] / batch
    assert 1.0 <= f["train_forward_per_pair"] / per_row_step < 1.2
    assert f["train_forward_per_pair"] * figures["train_batch_size"] == f["unet_cfg_forward_train_minibatch"]
    assert 0.5 < f["backward_forward_ratio"] < 2.5
    assert f["train_recompute_per_row_step"] == 0  # fp32: no recompute
    assert f["train_per_pair"] == pytest.approx(f["train_forward_per_pair"] * (1 + f["backward_forward_ratio"]))
    assert m["sampler_tflops"] == pytest.approx(f["sampling_per_image"] * m["sampler_images_per_s"] / 1e12)
    assert m["learner_tflops"] == pytest.approx(f["train_per_pair"] * m["learner_pairs_per_s"] / 1e12)
    assert {r["metric"] for r in figures["rows"]} >= {"sampler throughput", "learner throughput", "elapsed"}
