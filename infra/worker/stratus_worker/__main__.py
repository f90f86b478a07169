"""Worker process entry point: `python -m stratus_worker` (the container's command) or `stratus worker`.

Reads the same settings as the functions (STRATUS_*), loads the model from STRATUS_MODEL_URI
(downloaded, verified, cached under STRATUS_MODEL_CACHE) or STRATUS_MODEL_DIR,
refuses a model whose digest differs from STRATUS_MODEL_DIGEST (cache keys name the digest),
checks the model against its golden outputs on this host and serves the fastest configuration
that computes them (stratus_engine.numerics) -- none does: exit 2 before taking any job, so the
health check never passes -- and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from stratus.errors import ModelLoadError
from stratus.observability import logger, metrics
from stratus.settings import get_settings


def check_model(model_dir: Path, expected_digest: str, *, files_checked: bool = False) -> dict:
    """The model is the one STRATUS_MODEL_DIGEST names: its manifest says so, and every file matches
    the manifest (files_checked: fetch() did that already)."""
    from stratus_engine.artifact import verify

    manifest_path = model_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ModelLoadError(f"{model_dir} is not a model directory (no manifest.json); set STRATUS_MODEL_DIR")
    manifest = json.loads(manifest_path.read_text())
    if expected_digest in ("", "unset"):
        raise ModelLoadError(
            f"STRATUS_MODEL_DIGEST is unset: set the ModelDigest parameter to this model's digest "
            f"{manifest.get('digest')} (manifest.json; `stratus model publish` prints it), so cache "
            f"keys name the model that computed them"
        )
    if manifest.get("digest") != expected_digest:
        raise ModelLoadError(
            f"model digest {manifest.get('digest')} differs from STRATUS_MODEL_DIGEST "
            f"{expected_digest}: cache keys would name the wrong model"
        )
    return manifest if files_checked else verify(model_dir, manifest)  # (a changed tokenizer or template too)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import boto3

    from stratus_engine.engine import Engine
    from stratus_engine.numerics import load_verified
    from stratus_worker.worker import Worker

    ap = argparse.ArgumentParser(
        prog="stratus_worker",
        description="Serve the jobs queue (default) or, with `serve`, SageMaker's /ping and /invocations on port 8080.",
    )
    ap.add_argument("mode", nargs="?", choices=["queue", "serve"], default="queue")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    args = ap.parse_args(argv)
    threads = args.threads
    settings = get_settings()
    # a worker serves one model: its metrics (tokens, TTFT, errors, ...) carry it as a dimension
    metrics.set_default_dimensions(model=settings.model_id)
    try:
        if settings.model_uri:  # AWS: the published model, verified and cached on local disk
            from stratus_engine.artifact import fetch

            model_dir = fetch(
                settings.model_uri,
                boto3.client("s3"),
                Path(settings.model_cache),
                expected_digest=settings.model_digest,
            )
        else:
            model_dir = Path(settings.model_dir)
        manifest = check_model(model_dir, settings.model_digest, files_checked=bool(settings.model_uri))
        verified = load_verified(model_dir, threads=threads, spin=settings.ort_spinning)
    except ModelLoadError as exc:  # NumericsError included: it names the host, the model and the errors
        logger.error("model refused", extra={"model_dir": str(model_dir), "reason": exc.message})
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    beside, headroom = settings.batch_rows_beside_interactive, settings.interactive_headroom
    engine = Engine(
        verified.model,
        max_batch=settings.max_batch,
        prefix_cache_bytes=settings.prefix_cache_mb << 20,
        batch_rows_beside_interactive=None if beside < 0 else beside,
        interactive_headroom=None if headroom < 0 else headroom,
    )
    engine.warm()  # (its first request would pay for it instead)
    worker = Worker(
        engine,
        settings,
        sqs=boto3.client("sqs"),
        table=boto3.resource("dynamodb").Table(settings.table),
        s3=boto3.client("s3"),
        stream_table=boto3.resource("dynamodb").Table(settings.stream_table),
    )
    logger.info(
        "model loaded",
        extra={"model_id": manifest.get("model_id"), "digest": manifest.get("digest"), "numerics": verified.as_dict()},
    )
    if args.mode == "serve":
        import threading

        from stratus_worker.sagemaker import serve

        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        serve(worker, stop)
        return 1 if worker.failure else 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    worker.run()
    return 1 if worker.failure else 0


if __name__ == "__main__":
    sys.exit(main())
