"""What the packaging tests share: the repository, the build directory and
the tools the CMake registration passes in the environment."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
BUILD = os.environ.get("NORMSERVE_BUILD_DIR") or os.path.join(REPO, "build")
CLI = os.environ.get("NORMSERVE_CLI") or os.path.join(BUILD, "bin",
                                                      "normserve-cli")

with open(os.path.join(REPO, "VERSION"), encoding="utf-8") as _f:
    VERSION = _f.readline().strip()


def clean_env(**extra):
    """This process's environment without anything pointing into the repo or
    its build (PYTHONPATH, NORMSERVE_*), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("NORMSERVE_")}
    env.update(extra)
    return env


def run(args, timeout=300, **kwargs):
    """Runs args; returns stdout; fails the test with both streams."""
    done = subprocess.run(args, capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    assert done.returncode == 0, (
        f"{args} exited with {done.returncode}\nstdout:\n{done.stdout}\n"
        f"stderr:\n{done.stderr}")
    return done.stdout
