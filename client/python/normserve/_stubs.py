"""Finds the Python stubs generated from proto/ at build time.

protoc writes them to ``<build dir>/python/normserve/v1/normserve_pb2.py``
(and ``..._pb2_grpc.py``); they import each other as ``normserve.v1``. This
package adds the generated ``normserve/`` directory to its own ``__path__`` so
that ``normserve.v1`` resolves there, looking, in order, at:

1. ``$NORMSERVE_PYTHON_STUBS`` (a ``<build dir>/python`` directory);
2. every ``sys.path`` entry (e.g. ``PYTHONPATH=build/python:client/python``);
3. ``build/python`` of the source tree this package lives in (what ``make``
   produces).
"""

import os
import sys

_STUB = os.path.join("normserve", "v1", "normserve_pb2.py")
_ENV = "NORMSERVE_PYTHON_STUBS"


def _candidates():
    env = os.environ.get(_ENV)
    if env:
        yield env
    yield from sys.path
    repo = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))))
    yield os.path.join(repo, "build", "python")


def extend_package_path(package_path):
    """Appends the generated stubs' ``normserve`` directory to package_path.

    Raises ImportError naming the places searched when there is none.
    """
    for root in _candidates():
        root = os.path.abspath(root or os.curdir)
        if os.path.isfile(os.path.join(root, _STUB)):
            directory = os.path.join(root, "normserve")
            if directory not in package_path:
                package_path.append(directory)
            return directory
    env = os.environ.get(_ENV)
    raise ImportError(
        "normserve: the generated gRPC stubs (normserve/v1/normserve_pb2.py) "
        "were not found. Run `make` in the normserve source tree (it generates "
        "them into build/python) and put that directory on PYTHONPATH, or set "
        f"{_ENV}=<build dir>/python"
        + (f" ({_ENV} is {env!r})" if env else ""))
