"""`./dev` does not delete the virtualenv the running system's processes were started from.

Run in a scratch copy of `dev` and `pyproject.toml`; pip is kept off the network, so had the
guard been missing the script would fail quickly too, but with the old `.venv` gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OLD_INTERPRETER = "/opt/some-other-python/bin/python3"  # need not exist: only the link is read


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    shutil.copy2(ROOT / "dev", tmp_path / "dev")
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python3").symlink_to(OLD_INTERPRETER)
    return tmp_path


@pytest.fixture
def supervisord(checkout: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A live process called supervisord whose pid sits where supervisord's would."""
    process = subprocess.Popen(["bash", "-c", "exec -a supervisord sleep 60"])
    run = checkout / ".stack" / "services" / "run"
    run.mkdir(parents=True)
    (run / "supervisord.pid").write_text(f"{process.pid}\n")
    yield process
    process.kill()
    process.wait(timeout=10)


def run_dev(checkout: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"SERVICES_DIR", "STACK_DIR"}}
    env.update(DEV_PYTHON=sys.executable, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(
        [str(checkout / "dev"), "--version"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_venv_of_another_interpreter_is_kept_while_the_system_runs_from_it(
    checkout: Path, supervisord: subprocess.Popen[bytes]
) -> None:
    result = run_dev(checkout)

    assert result.returncode == 1
    assert "stop them first (.venv/bin/just down)" in result.stderr
    assert OLD_INTERPRETER in result.stderr
    assert os.readlink(checkout / ".venv" / "bin" / "python3") == OLD_INTERPRETER
    assert supervisord.poll() is None


@pytest.mark.parametrize("left_behind", ["dead", "reused"])
def test_a_stale_pid_file_does_not_block_making_the_venv_again(
    checkout: Path, supervisord: subprocess.Popen[bytes], left_behind: str
) -> None:
    supervisord.kill()
    supervisord.wait(timeout=10)
    if left_behind == "reused":  # the pid now names some other live process
        pidfile = checkout / ".stack" / "services" / "run" / "supervisord.pid"
        pidfile.write_text(f"{os.getpid()}\n")

    result = run_dev(checkout)

    assert "stop them first" not in result.stderr
    # The old virtualenv went; the new one is made by the interpreter asked for (its packages
    # cannot come: pip has no index here).
    link = checkout / ".venv" / "bin" / "python3"
    assert os.path.realpath(link) == os.path.realpath(sys.executable)
