"""Subprocess work that a test module starts at the beginning of the session (see conftest's `background_work`): a
command run at low priority, its output kept in a file, collected by the tests that need it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class BackgroundRun:
    """`command` started now at niceness 10 (it takes the CPU the suite leaves idle), output in `log`."""

    def __init__(self, command: list[str], log: Path, **popen_kwargs) -> None:
        self.log = Path(log)
        with open(self.log, "w") as handle:  # a file, not a pipe: a full pipe would stall an unread process
            self.process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10), **popen_kwargs
            )

    def output(self, timeout: float = 900) -> str:
        """Waits for the command and returns its output (stdout and stderr together); fails the test if it failed."""
        self.process.wait(timeout=timeout)
        text = self.log.read_text()
        assert self.process.returncode == 0, text[-4000:]
        return text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
