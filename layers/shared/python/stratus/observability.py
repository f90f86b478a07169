"""One Logger, Metrics (EMF) and Tracer for every function and the workers. Never log prompt text.

The template sets POWERTOOLS_SERVICE_NAME and POWERTOOLS_METRICS_NAMESPACE; the defaults here
serve processes started without them (workers, the CLI, tests).
"""

import os

from aws_lambda_powertools import Logger, Metrics, Tracer

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "stratus")

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Stratus"), service=SERVICE)
tracer = Tracer(service=SERVICE)
