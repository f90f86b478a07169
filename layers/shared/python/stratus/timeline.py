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

A streamed request's phases (stream_phases, the API's `stream timeline` log line), up to its first text:

  in ─submit─▶ sent ─queue─▶ taken ─claim─▶ started ─prefill─▶ first token ─first_text─▶ first text sent
  ttft   the API's own: from the request's arrival to its first text sent (the client's TTFT, less the
         gateway)
  prefill    the engine: waiting for a batch slot, prefill, the first token (timings.ttft_s)
  first_text the first token's chunk: the flush, its hand-over (stratus.wake) or its write and read
  rest   from the first text to the end; total
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


def stream_phases(job: Job | None, t_in: float, t_sent: float, t_first: float | None, t_end: float) -> dict[str, float]:
    """-> {phase: seconds} of a stream (the module's second diagram). job: as it finished, with its
    worker's marks (None, or without them: submit, ttft, rest and total only); t_first: when its
    first text went out (None: it had none)."""
    out = {"submit": t_sent - t_in}
    t = (job.timings or {}) if job is not None else {}
    taken, started, first = t.get("taken_s"), t.get("started_s"), t.get("ttft_s")
    if t_first is not None and None not in (taken, started, first):
        out |= {
            "queue": job.created_at + taken - t_sent,
            "claim": started - taken,
            "prefill": first,
            "first_text": t_first - (job.created_at + started + first),
        }
    if t_first is not None:
        out |= {"ttft": t_first - t_in, "rest": t_end - t_first}
    out["total"] = t_end - t_in
    return out


def server_timing(spans: dict[str, float]) -> str:
    """{phase: seconds} -> a Server-Timing header value (durations in milliseconds)."""
    return ", ".join(f"{name};dur={1000 * s:.1f}" for name, s in spans.items())


def read_server_timing(header: str) -> dict[str, float]:
    """A Server-Timing header value -> {phase: milliseconds} (benchmarks and tests read replies)."""
    return {name: float(dur) for name, _, dur in (part.partition(";dur=") for part in header.split(", ") if part)}
