"""Reward-services benchmark: images/s of each reward in-process vs on Ray Serve.

For each reward (JPEG, aesthetic, LLaVA + BERTScore; tiny offline models unless told otherwise):
(a) the plain in-process function on one torch thread (what a 1-CPU replica runs);
(b) the Serve application with 1 replica (1 CPU), driven by the sampler-side RewardClient
    through DeploymentHandles with a few batches in flight (target for JPEG at batch 32:
    >= 80% of (a)); (a) and (b) are measured in alternating windows and the medians compared;
(c) the same with 2 replicas;
(d) the batching gain: 16 concurrent 1-image requests with `@serve.batch` merging up to 16 of
    them (user_config max_batch_size=16) vs not merging (max_batch_size=1), and 16-image requests.
    JPEG has no model and no @serve.batch, so for it (d) only compares request sizes.

Each figure is images/s over a fixed wall-clock window after a warm-up. The driver (this process,
which also serialises the requests) and the replicas share the machine's CPUs, as samplers and
reward replicas would on one node. Prints a table; writes JSON.

    python bench/rewards.py                          # all rewards, 512x512 images, batch 32
    python bench/rewards.py --rewards jpeg_compressibility --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALL = ("jpeg_compressibility", "aesthetic", "llava_bertscore")


def make_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients with blocks and noise: JPEG sizes like real samples, not flat or pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        base = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(60, 255, 3)
        top, left = rng.integers(0, size // 2, 2)
        base[top : top + size // 3, left : left + size // 3] = rng.uniform(0, 255, 3)
        out[i] = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    return out


def in_process_function(reward: str) -> Callable[[np.ndarray, list[str]], object]:
    if reward.startswith("jpeg"):
        from reward_services.jpeg import jpeg_compressibility

        return lambda images, prompts: jpeg_compressibility(images)
    if reward == "aesthetic":
        from reward_services.aesthetic_model import AestheticPredictor

        predictor = AestheticPredictor(device="cpu")
        return lambda images, prompts: predictor(images)
    from reward_services.bertscore import BertScore
    from reward_services.captioner import Captioner
    from reward_services.functions import llava_bertscore_rewards

    captioner, bertscore = Captioner(device="cpu"), BertScore(device="cpu")
    return lambda images, prompts: llava_bertscore_rewards(captioner, bertscore, images, prompts)


def in_process_rate(fn, images: np.ndarray, prompts: list[str], seconds: float) -> float:
    fn(images[:2], prompts[:2])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(images, prompts)
        done += len(images)
    return done / (time.perf_counter() - start)


def serve_rate(client, images: np.ndarray, prompts: list[str], in_flight: int, seconds: float) -> float:
    """Keep `in_flight` batches submitted (as a sampler would) and count answered images/s."""
    for pending in [client.submit(images, prompts) for _ in range(2)]:  # warm-up
        pending.result()
    queue: deque = deque()
    done, start = 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        while elapsed < seconds and len(queue) < in_flight:
            queue.append(client.submit(images, prompts))
        if not queue:
            break
        queue.popleft().result()
        done += len(images)
        elapsed = time.perf_counter() - start
    return done / (time.perf_counter() - start)


def deploy(reward: str, replicas: int, max_batch_size: int | None = None) -> None:
    from ray import serve

    from reward_services.registry import build_reward_app, reward_app

    spec = reward_app(reward)
    options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 1}}
    if max_batch_size is not None:
        options["user_config"] = {
            "max_batch_size": max_batch_size,
            "batch_wait_timeout_s": 0.01,
            "model_batch_size": 16,
        }
    model_deployment = {"llava_bertscore": "LlavaCaptioner"}.get(reward, spec.ingress)  # the pool that scales
    args = {"deployment_options": {model_deployment: options}}
    if reward == "llava_bertscore":  # the captioner pool is what scales; the ingress stays light
        args["deployment_options"]["LlavaBertScore"] = {"ray_actor_options": {"num_cpus": 0.25}}
        args["deployment_options"]["BertScorer"] = {"ray_actor_options": {"num_cpus": 1}}
    serve.run(build_reward_app(reward, args), name=spec.app_name, route_prefix=spec.route_prefix)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rewards", default=",".join(ALL))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=3, help="batches in flight per replica")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring window per figure")
    parser.add_argument("--rounds", type=int, default=3, help="alternating in-process / 1-replica windows")
    parser.add_argument("--out", default="bench/results/rewards.json")
    args = parser.parse_args()
    rewards = [r for r in args.rewards.split(",") if r]

    import ray
    import torch
    from ray import serve

    from reward_services.client import RewardClient

    torch.set_num_threads(1)
    images = make_images(args.batch, args.resolution)
    prompts = [f"a photo of animal {i}" for i in range(args.batch)]
    single, single_prompt = images[:1], prompts[:1]
    sixteen, sixteen_prompts = images[:16], prompts[:16]
    results: dict = {
        "resolution": args.resolution,
        "batch": args.batch,
        "seconds": args.seconds,
        "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg()[0],
        "rewards": {},
    }
    print(
        f"{args.resolution}x{args.resolution} images, batch {args.batch}, {args.seconds:.0f} s per figure, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for reward in rewards:
            batched = reward != "jpeg_compressibility"
            function = in_process_function(reward)
            deploy(reward, replicas=1, max_batch_size=16 if batched else None)
            client = RewardClient({reward: 1.0}, max_images_per_call=args.batch)
            # (a) vs (b) in alternating windows, so load from other processes hits both alike.
            in_process, one_replica = [], []
            for _ in range(args.rounds):
                in_process.append(in_process_rate(function, images, prompts, args.seconds))
                one_replica.append(serve_rate(client, images, prompts, args.in_flight, args.seconds))
            figures = {
                "in_process": float(np.median(in_process)),
                "serve_1_replica": float(np.median(one_replica)),
                "serve_1_replica_over_in_process": float(
                    np.median(np.array(one_replica) / np.array(in_process))
                ),
                "rounds": {"in_process": in_process, "serve_1_replica": one_replica},
            }
            results["rewards"][reward] = figures
            figures["serve_1_replica_batch16_requests"] = serve_rate(
                client, sixteen, sixteen_prompts, 16, args.seconds
            )
            figures["serve_1_replica_batch1_requests"] = serve_rate(
                client, single, single_prompt, 16, args.seconds
            )
            if batched:
                deploy(reward, replicas=1, max_batch_size=1)
                client = RewardClient({reward: 1.0}, max_images_per_call=args.batch)
                figures["serve_1_replica_batch1_requests_no_serve_batch"] = serve_rate(
                    client, single, single_prompt, 16, args.seconds
                )
            deploy(reward, replicas=2, max_batch_size=16 if batched else None)
            client = RewardClient({reward: 1.0}, max_images_per_call=args.batch)
            figures["serve_2_replicas"] = serve_rate(
                client, images, prompts, 2 * args.in_flight, args.seconds
            )
            serve.delete(reward)
            del function

            print(f"{reward:22s} in-process           {figures['in_process']:9.1f} img/s")
            print(
                f"{reward:22s} serve, 1 replica     {figures['serve_1_replica']:9.1f} img/s "
                f"({figures['serve_1_replica_over_in_process']:.0%} of in-process, median of {args.rounds} "
                "alternating rounds)"
            )
            print(
                f"{reward:22s} serve, 2 replicas    {figures['serve_2_replicas']:9.1f} img/s "
                f"({figures['serve_2_replicas'] / figures['serve_1_replica']:.2f}x 1 replica)"
            )
            print(
                f"{reward:22s} 16-image requests    {figures['serve_1_replica_batch16_requests']:9.1f} img/s; "
                f"1-image requests {figures['serve_1_replica_batch1_requests']:.1f} img/s"
            )
            if batched:
                unmerged = figures["serve_1_replica_batch1_requests_no_serve_batch"]
                print(
                    f"{reward:22s} @serve.batch gain    {figures['serve_1_replica_batch1_requests'] / unmerged:9.2f}x "
                    f"on 16 concurrent 1-image requests ({unmerged:.1f} img/s unmerged)"
                )
    finally:
        serve.shutdown()
        ray.shutdown()

    results["load_avg_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
