#!/bin/sh
# The api function's entry point in AWS: the Lambda Web Adapter (AWS_LAMBDA_EXEC_WRAPPER=/opt/bootstrap)
# starts this, waits for GET /health, then forwards each invocation to it as an HTTP request and
# streams the response back (AWS_LWA_INVOKE_MODE=response_stream).
export PYTHONPATH="/opt/python:${PYTHONPATH:-}"  # the shared layer
exec python3 -m uvicorn asgi:app --host 127.0.0.1 --port "${AWS_LWA_PORT:-8080}" --no-access-log --lifespan on
