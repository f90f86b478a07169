"""Function instances for local mode: each is a separate process that handles one event at a time,
as a Lambda execution environment does (its own imports, clients and warm caches; a cold start
when the pool has no idle instance). Handlers run unmodified: they are imported from the template's
CodeUri with the template's environment.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import traceback
from dataclasses import dataclass

MAX_INSTANCES = 64  # per function, like a reserved-concurrency cap


def _instance_main(conn, function: str, env: dict[str, str]) -> None:
    """Child process: load the handler once, then answer events until the pipe closes."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: `stratus serve` stops it in order

    from stratus_local.template import LambdaContext, apply_environment, load_handler, load_template

    if env.get("STRATUS_LOCAL_LOG"):  # the function's stdout (logs, EMF metrics) goes to its log file
        fd = os.open(env["STRATUS_LOCAL_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    apply_environment(env)
    handler, _ = load_handler(load_template(), function)
    conn.send(("ready", None))  # the init phase is over
    while True:
        try:
            event = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", handler(event, LambdaContext(function_name=function))))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class FunctionError(RuntimeError):
    """The handler raised (Lambda reports this as an unhandled function error)."""


@dataclass(eq=False)
class _Instance:
    process: mp.Process
    conn: object


class FunctionPool:
    """Idle instances of one function; `invoke` borrows one (or starts one) per event."""

    def __init__(self, function: str, env: dict[str, str]) -> None:
        self.function, self.env = function, env
        self._idle: list[_Instance] = []
        self._all: list[_Instance] = []
        self._lock = threading.Condition()
        self._ctx = mp.get_context("spawn")  # a clean interpreter, like a new execution environment

    def invoke(self, event: dict) -> dict:
        inst = self._acquire()
        try:
            inst.conn.send(event)
            status, value = inst.conn.recv()
        except (EOFError, OSError) as exc:
            self._discard(inst)
            raise FunctionError(f"{self.function} instance died") from exc
        self._release(inst)
        if status == "error":
            raise FunctionError(f"{self.function} raised:\n{value}")
        return value

    def warm(self, n: int = 1) -> None:
        """Start instances until n are idle (their init done), like provisioned concurrency."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n) as pool:
            for inst in list(pool.map(lambda _: self._acquire(), range(n))):
                self._release(inst)

    def close(self) -> None:
        with self._lock:
            for inst in self._all:
                inst.conn.close()
                inst.process.terminate()
            for inst in self._all:
                inst.process.join(timeout=5)
            self._all.clear()
            self._idle.clear()

    def _acquire(self) -> _Instance:
        with self._lock:
            while not self._idle and len(self._all) >= MAX_INSTANCES:
                self._lock.wait()
            if self._idle:
                return self._idle.pop()
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(
                target=_instance_main,
                args=(child, self.function, self.env),
                daemon=True,
                name=f"{self.function}-{len(self._all)}",
            )
            inst = _Instance(proc, parent)
            self._all.append(inst)  # counted now; its init (a cold start) runs outside the lock
        proc.start()
        try:
            parent.recv()  # ("ready", None) once the handler module is loaded
        except (EOFError, OSError) as exc:
            self._discard(inst)
            raise FunctionError(f"{self.function} failed to start (see its log)") from exc
        return inst

    def _release(self, inst: _Instance) -> None:
        with self._lock:
            self._idle.append(inst)
            self._lock.notify()

    def _discard(self, inst: _Instance) -> None:
        with self._lock:
            if inst in self._all:
                self._all.remove(inst)
            self._lock.notify()
