"""Where a request's time went: the phases of one whole (not streamed) request, from the marks the
API and the worker leave, for a `Server-Timing` header and the API's `request timeline` log line.

  in ─submit─▶ sent ─queue─▶ taken ─claim─▶ started ─engine─▶ finished ─result─▶ written ─notice─▶ seen ─reply─▶ out
  (API)          (worker's marks, in its job's timings, relative to the job's created_at)      (API)

  submit  the API: authenticate, cache lookup, charge, job write, message send
  queue   the message's trip to a worker (SQS, the worker's receive)
  claim   the worker: claim the job (QUEUED -> RUNNING), render and tokenize, hand it to the engine
  engine  the engine: waiting for a batch slot, prefill, decode (timings.total_s)
  result  the worker: shape the result, until its DONE write begins (the job's updated_at)
  notice  the DONE write, the API's re-reads until one sees it, and its result read (S3 when large)
  reply   the API: shape the body

`queue` and `notice` cross from one host's clock to another's: on AWS they carry the clocks'
skew (NTP keeps it to milliseconds). A job another request made (a coalesced one) or a worker
without the marks gives only submit, engine and total.
"""

from __future__ import annotations

from stratus.contracts import Job


def phases(job: Job, t_in: float, t_sent: float, t_seen: float, t_out: float) -> dict[str, float]:
    """-> {phase: seconds}, in order (the module's diagram), `total` last."""
    t = job.timings or {}
    out = {"submit": t_sent - t_in}
    taken, started, engine = t.get("taken_s"), t.get("started_s"), t.get("total_s")
    if taken is not None and started is not None and engine is not None and job.updated_at:
        finished = job.created_at + started + engine
        out |= {
            "queue": job.created_at + taken - t_sent,
            "claim": started - taken,
            "engine": engine,
            "result": job.updated_at - finished,
            "notice": t_seen - job.updated_at,
            "reply": t_out - t_seen,
        }
    elif engine is not None:
        out["engine"] = engine
    out["total"] = t_out - t_in
    return out


def server_timing(spans: dict[str, float]) -> str:
    """{phase: seconds} -> a Server-Timing header value (durations in milliseconds)."""
    return ", ".join(f"{name};dur={1000 * s:.1f}" for name, s in spans.items())


def read_server_timing(header: str) -> dict[str, float]:
    """A Server-Timing header value -> {phase: milliseconds} (benchmarks and tests read replies)."""
    return {name: float(dur) for name, _, dur in (part.partition(";dur=") for part in header.split(", ") if part)}
