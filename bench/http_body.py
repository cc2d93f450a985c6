"""Worst HTTP bodies for a reward replica: peak Python memory and time of parsing one request.

`reward_services.http_api.parse_request_body` is what every replica runs on a request before
any model sees it, so what it costs per body byte bounds what a small request can do to a
replica. The bodies stay under the default limits (128 MiB body, 64 images, 1000-character
prompts); each carries one valid 8x8 PNG so parsing goes as far as it can:

- long_key_list: metadata [{<10,000-character key>: [0] * N}] (the NaN/inf scan used to build a
  path string per element, ~10 KB each);
- deep_nesting: metadata nested lists as deep as the JSON parser allows;
- long_prompts_many_images: 64 prompts over the limit, after 64 images that must not be decoded.

Each body is parsed in a fresh child process, capped at --cap-gib of address space and
--timeout-s seconds (the old scan needed ~10 GB for a 3 MB body). Memory is the child's peak
RSS growth over the call (ru_maxrss after minus before; the body itself is built first), time is
the wall time of the call. Prints a table; writes JSON.

    python bench/http_body.py [--out bench/results/http_body.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from reward_services.http_api import RequestLimits, RewardInputError, encode_image, parse_request_body  # noqa: E402


def _small_image() -> str:
    return encode_image(np.zeros((8, 8, 3), np.uint8))


def _one(metadata: object) -> bytes:
    return json.dumps({"images": [_small_image()], "prompts": ["a cat"], "metadata": metadata}).encode()


def _deep(depth: int) -> bytes:
    return (b'{"images": ["' + _small_image().encode() + b'"], "prompts": ["a cat"], "metadata": [{"a": '
            + b"[" * depth + b"]" * depth + b"}]}")


def _long_prompts() -> bytes:
    # 64 noise PNGs of 600x600 (~1.4 MB of base64 each, ~92 MB in all, under the 128 MiB limit),
    # then 64 prompts each over the 1000-character limit.
    noise = encode_image(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8))
    return json.dumps({"images": [noise] * 64, "prompts": ["p" * 5000] * 64}).encode()


KEY = "k" * 10_000
BODIES = {  # name -> how to build it (built only in the child that measures it)
    "long_key_list_29KiB": lambda: _one([{KEY: [0] * 10_000}]),
    "long_key_list_3MiB": lambda: _one([{KEY: [0] * 1_000_000}]),
    "long_key_list_16MiB": lambda: _one([{KEY: [0] * 5_000_000}]),
    "wide_dict_16MiB": lambda: _one([{f"{i:08d}" + "k" * 40: 0 for i in range(250_000)}]),
    "deep_nesting_100000": lambda: _deep(100_000),
    "long_prompts_64_images_92MiB": _long_prompts,
}


def measure(name: str) -> dict[str, object]:
    """In this (child) process: parse body `name` once."""
    body = BODIES[name]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        parse_request_body(body, RequestLimits())
        outcome = "accepted"
    except RewardInputError as exc:
        outcome = f"{exc.status}: {str(exc)[:60]}"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    return {"body_bytes": len(body), "peak_mib": peak / 1024, "seconds": seconds, "outcome": outcome}


def measure_in_child(name: str, cap_gib: float, timeout_s: float) -> dict[str, object]:
    cap = int(cap_gib * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                              timeout=timeout_s, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"body_bytes": None, "peak_mib": None, "seconds": None,
                "outcome": f"still parsing after {timeout_s:.0f} s (killed)"}
    if done.returncode != 0:
        return {"body_bytes": None, "peak_mib": None, "seconds": None,
                "outcome": f"child died (rc {done.returncode}; over {cap_gib} GiB?): {done.stderr.strip()[-80:]}"}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/http_body.json")
    parser.add_argument("--cap-gib", type=float, default=4.0, help="address-space cap of each child")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="wall-clock cap of each child")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: measure one body, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    results = {}
    print(f"{'body':28} {'size':>10} {'peak MiB':>9} {'seconds':>8}  outcome")
    for name in BODIES:
        row = results[name] = measure_in_child(name, args.cap_gib, args.timeout_s)
        mib = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
        secs = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
        size = "-" if row["body_bytes"] is None else row["body_bytes"]
        print(f"{name:28} {size:>10} {mib:>9} {secs:>8}  {row['outcome']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
