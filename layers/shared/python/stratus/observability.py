"""One Logger, Metrics (EMF) and Tracer for every function and the workers. Never log prompt text.

The template sets POWERTOOLS_SERVICE_NAME and POWERTOOLS_METRICS_NAMESPACE; the defaults here
serve processes started without them (workers, the CLI, tests).

Metrics are added from several threads (a worker's engine, writer and chunk threads; a batch
slice's lines), and Powertools' metric set is a plain dict that add_metric may serialize and clear
when it fills: adding and flushing hold one lock, or a flush could raise mid-iteration or print
values twice.
"""

import functools
import os
import threading

from aws_lambda_powertools import Logger, Metrics, Tracer

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "stratus")

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Stratus"), service=SERVICE)
tracer = Tracer(service=SERVICE)

_METRIC_SET = threading.RLock()


def _one_thread_at_a_time(method):
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with _METRIC_SET:
            return method(*args, **kwargs)

    return locked


for _name in ("add_metric", "flush_metrics", "clear_metrics"):  # the provider's: log_metrics flushes through it
    setattr(metrics.provider, _name, _one_thread_at_a_time(getattr(metrics.provider, _name)))
