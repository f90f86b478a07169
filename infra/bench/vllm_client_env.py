"""A throwaway environment where `vllm bench serve` (vLLM's load generator, a client only) runs on
a CPU host, for `make bench-clients`.

  python infra/bench/vllm_client_env.py build/venv-vllm

vLLM's wheel pins a torch whose wheels pull CUDA (and which this host's index cannot resolve), so
`pip install vllm` fails here. The client needs none of the GPU side: vllm goes in without its
dependencies, torch as the CPU build (2.13.0), then vllm's own requirements less the GPU kernels
and media codecs. The tool's code is vLLM's, unmodified; only its environment differs.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PathDistribution
from pathlib import Path

VLLM, TORCH = "vllm==0.34.0", "torch==2.13.0"
# requirement names (lower case, by prefix) the client never imports: GPU kernels, codecs, compilers
GPU_ONLY = (
    "torch",
    "nvidia",
    "flashinfer",
    "cupy",
    "ray",
    "triton",
    "xformers",
    "quack",
    "deep",
    "pynvvideocodec",
    "tilelang",
    "humming-kernels",
    "tokenspeed",
    "nvtx",
    "fastsafetensors",
    "instanttensor",
    "apache-tvm-ffi",
)


def requirement_name(req: str) -> str:
    for stop in "[=<>!~; ":
        req = req.split(stop)[0]
    return req.strip().lower().replace("_", "-")


def main() -> None:
    venv = Path(sys.argv[1] if len(sys.argv) > 1 else "build/venv-vllm")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, "--no-deps", VLLM, "xgrammar==0.2.8"], check=True)
    [meta] = (venv / "lib").glob("python3*/site-packages/vllm-*.dist-info")
    needed = [
        r.split(";")[0].strip()
        for r in PathDistribution(meta).requires or []
        if "extra ==" not in r and not requirement_name(r).startswith(GPU_ONLY)
    ]
    subprocess.run([*pip, *needed], check=True)
    subprocess.run([str(venv / "bin" / "vllm"), "bench", "serve", "--help"], check=True, capture_output=True)
    print(f"{venv / 'bin' / 'vllm'} bench serve runs")


if __name__ == "__main__":
    main()
