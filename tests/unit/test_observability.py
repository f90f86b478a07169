"""The shared Metrics object under threads: every value added is printed once, and nothing raises."""

from __future__ import annotations

import json
import sys
import threading

from aws_lambda_powertools.metrics import MetricUnit

from stratus.observability import metrics


def test_metrics_added_from_many_threads_are_each_emitted_once(capsys):
    metrics.flush_metrics()
    capsys.readouterr()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch often: a flush meets adds from the others
    errors = []

    def add(t: int) -> None:
        try:
            for i in range(3000):  # seven names: the set fills to 100 values and flushes, again and again
                metrics.add_metric(name=f"threaded_{(i + t) % 7}", unit=MetricUnit.Count, value=1)
        except Exception as exc:
            errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=add, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics.flush_metrics()
    finally:
        sys.setswitchinterval(interval)
    emitted = 0
    for line in capsys.readouterr().out.splitlines():
        blob = json.loads(line)
        for m in blob["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            if m["Name"].startswith("threaded_"):  # (not another test's lingering thread's)
                values = blob[m["Name"]]
                emitted += len(values) if isinstance(values, list) else 1
    assert errors == [] and emitted == 8 * 3000


def test_traces_never_record_a_handlers_response():
    # (Powertools' capture_lambda_handler records the response as trace metadata by default, and the
    # api function's responses carry outputs and echoed prompts)
    from aws_lambda_powertools.shared import constants

    from stratus_local.template import load_template

    env = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    assert env[constants.TRACER_CAPTURE_RESPONSE_ENV] == "false"
