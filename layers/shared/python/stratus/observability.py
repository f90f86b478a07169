"""One Logger, Metrics (EMF) and Tracer for every function. Never log prompt text."""

from aws_lambda_powertools import Logger, Metrics, Tracer

logger = Logger()
metrics = Metrics()
tracer = Tracer()
