"""Running the steps' commands (output streamed, secrets masked) and where things are.

Standard library only at import: it runs before the project's environment exists."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the clone: setup.sh, benchmarks/, results/


VENV_PY = ROOT / ".venv" / "bin" / "python"


DEFAULT_MODEL = "unsloth/csm-1b"  # checkpoints.DEFAULT_REPO (this file imports no model code)


MIN_GPU_GB = 8  # bf16 weights 3.1 GB + Mimi + caches and activations for a few streams


# per extra stream: backbone KV cache at 2048 positions (bf16) + Mimi state + margin
STREAM_GB = 0.15


@dataclass
class Runner:
    dry_run: bool = False
    secrets: list[str] = field(default_factory=list)

    def mask(self, text: str) -> str:
        for s in self.secrets:
            if s:
                text = text.replace(s, s[:3] + "***" if len(s) > 6 else "***")
        return text

    def say(self, msg: str):
        print(self.mask(msg), flush=True)

    def run(
        self, cmd: list[str], check: bool = True, env: dict | None = None, capture: bool = False
    ):
        """Run a command (or print it in a dry run); its output streams through, masked."""
        self.say(f"$ {' '.join(shlex.quote(c) for c in cmd)}")
        if self.dry_run:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if not capture:
                print(self.mask(line), end="", flush=True)
        proc.wait()
        out = "".join(lines)
        if check and proc.returncode != 0:
            raise SystemExit(f"step failed (exit {proc.returncode}): {self.mask(' '.join(cmd))}\n"
                             + self.mask(out[-2000:]))
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "")
