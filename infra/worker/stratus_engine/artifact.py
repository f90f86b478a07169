"""Model artifacts: a built model directory, its manifest (per-file SHA-256 + one digest), and
its home in S3.

  publish   DIR -> s3://bucket/<prefix><model id>/<digest[:16]>/   files first, manifest.json last
  fetch     s3://.../ -> <cache>/<digest>/   verified file by file against the manifest, reused
            when already complete (a worker restart or a second worker on the host downloads nothing)

The manifest is written last on publish and read first on fetch, so a reader never trusts a
half-uploaded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from stratus.errors import ModelLoadError
from stratus.manifest import MANIFEST, artifact_digest, split_uri

COMPLETE = ".complete"  # written after every file of a fetched model is verified


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(model_dir: Path, manifest: dict | None = None) -> dict:
    """Check every file against the manifest and the manifest against its digest; returns it."""
    manifest = manifest or json.loads((model_dir / MANIFEST).read_text())
    files = manifest.get("files", {})
    if artifact_digest(files) != manifest.get("digest"):
        raise ModelLoadError(f"{model_dir}: the manifest's digest does not match its file list")
    for name, meta in files.items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise ModelLoadError(
                f"{model_dir}/{name}: missing or different from the manifest (sha256 {meta['sha256'][:12]}…)"
            )
    return manifest


def publish(model_dir: Path, s3, bucket: str, prefix: str = "models/", only: tuple[str, ...] | None = None) -> str:
    """Upload a verified model directory; returns its URI (the workers' MODEL_URI). only: upload
    just these files (and the manifest): `stratus serve` gives the API the tokenizer this way while
    its workers load the directory itself."""
    manifest = verify(model_dir)
    base = f"{prefix.strip('/')}/{manifest['model_id']}/{manifest['digest'][:16]}/"
    for name in sorted(n for n in manifest["files"] if only is None or n in only):
        s3.upload_file(str(model_dir / name), bucket, base + name)
    s3.upload_file(str(model_dir / MANIFEST), bucket, base + MANIFEST)
    return f"s3://{bucket}/{base}"


def fetch(uri: str, s3, cache_root: Path, *, expected_digest: str | None = None) -> Path:
    """Download (or reuse) the model at `uri` under cache_root/<digest>/, verified."""
    bucket, prefix = split_uri(uri)
    try:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read())
    except Exception as exc:
        raise ModelLoadError(f"cannot read {uri}{MANIFEST}: {exc}") from exc
    digest = manifest.get("digest", "")
    if expected_digest not in (None, "", "unset") and digest != expected_digest:
        raise ModelLoadError(f"{uri} has digest {digest}, expected {expected_digest}")
    target = Path(cache_root) / digest
    if (target / COMPLETE).is_file():
        return target
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=cache_root))
    try:
        for name in manifest["files"]:
            s3.download_file(bucket, prefix + name, str(tmp / name))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        verify(tmp, manifest)
        (tmp / COMPLETE).write_text(digest)
        try:
            os.rename(tmp, target)
        except OSError:  # another worker on this host finished first
            if not (target / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
