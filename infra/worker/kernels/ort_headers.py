"""Put onnxruntime's C/C++ API headers in a folder, for building Stratus's kernels (CMakeLists.txt).

The onnxruntime wheel ships no headers; Debian's libonnxruntime-dev does (85 KB, pinned by its
SHA-256 below). The kernels use API version 21 (onnxruntime 1.21), which every later onnxruntime
serves. Standard library only: the worker image's build stage runs it too.

  python3 infra/worker/kernels/ort_headers.py build/ort-include
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

DEB_URL = "http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
DEB_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h",
           "onnxruntime_float16.h", "onnxruntime_lite_custom_op.h")  # fmt: skip


def ar_members(data: bytes) -> dict[str, bytes]:
    """A .deb is an `ar` archive: an 8-byte magic, then 60-byte headers each before its member."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    members, at = {}, 8
    while at + 60 <= len(data):
        header = data[at : at + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        members[name] = data[at + 60 : at + 60 + size]
        at += 60 + size + (size % 2)  # members are 2-byte aligned
    return members


def extract_headers(deb: bytes, out: Path) -> list[Path]:
    data = next(v for k, v in ar_members(deb).items() if k.startswith("data.tar"))
    written = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name in HEADERS and "/include/onnxruntime/" in member.name:
                (out / name).write_bytes(tar.extractfile(member).read())
                written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args(argv).out
    if all((out / h).is_file() for h in HEADERS):
        return 0
    with urllib.request.urlopen(DEB_URL, timeout=60) as response:
        deb = response.read()
    digest = hashlib.sha256(deb).hexdigest()
    if digest != DEB_SHA256:
        print(f"{DEB_URL}: SHA-256 {digest}, expected {DEB_SHA256}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    written = extract_headers(deb, out)
    missing = sorted(set(HEADERS) - {p.name for p in written})
    if missing:
        print(f"{DEB_URL}: no {', '.join(missing)} in the package", file=sys.stderr)
        return 1
    print(f"onnxruntime API headers (Debian libonnxruntime-dev 1.21.0) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
