"""Functions run by the AWS Lambda Web Adapter (AWS_LAMBDA_EXEC_WRAPPER=/opt/bootstrap), locally.

In AWS the adapter starts the function's Handler (a start script such as run.sh) as a web server
on AWS_LWA_PORT, waits for its readiness path, then turns each invocation into an HTTP request
and streams the response back. Here the same script runs with the function's environment on a
free port, with this interpreter first on PATH; the gateway forwards HTTP requests to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from stratus_local.template import function_dir


class WebApp:
    def __init__(self, template: dict, function: str, env: dict[str, str], port: int, log: Path) -> None:
        props = template["Resources"][function]["Properties"]
        self.function, self.url = function, f"http://127.0.0.1:{port}"
        self.ready_path = env.get("AWS_LWA_READINESS_CHECK_PATH", "/")
        bin_dir = str(Path(sys.executable).parent)
        full_env = {
            **os.environ,
            **env,
            "AWS_LWA_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        }
        self.log = log
        self.process = subprocess.Popen(
            ["sh", props["Handler"]],
            cwd=function_dir(template, function),
            env=full_env,
            stdout=open(log, "ab"),  # noqa: SIM115 — the child keeps the file
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # (stopped by `stratus serve`, not by Ctrl-C)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until GET <readiness path> answers (any status below 500), as the adapter waits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.function} exited with {self.process.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                    if r.status < 500:
                        return
            except OSError as exc:
                if getattr(exc, "code", 0) and exc.code < 500:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.function} did not answer {self.ready_path} in {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
