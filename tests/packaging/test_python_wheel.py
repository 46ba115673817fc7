"""The Python client as a wheel (make python-wheel), installed into a fresh
`python3 -m venv --system-site-packages` with nothing from a package index,
used from a directory outside the tree."""

import json
import os
import sys
import zipfile

import numpy as np
import pytest
import torch

from packaging_util import BUILD, REPO, VERSION, clean_env, run


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    text = run([os.path.join(REPO, "scripts", "python-wheel.sh"), BUILD,
                str(out)])
    path = text.strip().splitlines()[-1]
    assert os.path.basename(path) == f"normserve-{VERSION}-py3-none-any.whl"
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--system-site-packages", str(root)])
    python = str(root / "bin" / "python")
    run([python, "-m", "pip", "install", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", wheel], env=clean_env())
    return python


def in_venv(python, code, *args, cwd):
    """Runs code with the venv's python from cwd, no path into the tree."""
    return run([python, "-c", code, *args], cwd=cwd, env=clean_env())


def test_wheel_carries_the_stubs_and_the_version(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in ("normserve/__init__.py", "normserve/client.py",
                 "normserve/torch.py", "normserve/_version.py",
                 "normserve/v1/normserve_pb2.py",
                 "normserve/v1/normserve_pb2_grpc.py",
                 f"normserve-{VERSION}.dist-info/METADATA"):
        assert want in names
    assert not [n for n in names if "test" in n or n.endswith(".pyc")]
    metadata = zipfile.ZipFile(wheel).read(
        f"normserve-{VERSION}.dist-info/METADATA").decode()
    assert f"Version: {VERSION}" in metadata
    assert "Requires-Dist: grpcio" in metadata
    assert "Provides-Extra: torch" in metadata


def test_imports_from_anywhere_without_torch(venv, tmp_path):
    code = ("import json, sys; sys.modules['torch'] = None; "
            "import importlib.metadata as m, normserve; "
            "print(json.dumps([normserve.__version__, normserve.__file__, "
            "m.version('normserve'), 'torch' in dir(normserve)]))")
    version, path, dist, _ = json.loads(in_venv(venv, code, cwd=tmp_path))
    assert version == dist == VERSION
    assert path.startswith(os.path.dirname(os.path.dirname(venv)))
    assert "site-packages" in path and not path.startswith(REPO)


def test_numpy_client_trains_from_the_wheel(venv, server, tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = """
import sys, numpy as np
sys.modules['torch'] = None
import normserve
x = np.load('x.npy')
with normserve.Client(sys.argv[1], timeout=30) as c:
    c.create_layer(3, layer_id='wheel-numpy')
    y = c.forward('wheel-numpy', x, training=True)
    g = c.backward('wheel-numpy', y.handle, np.ones_like(x))
np.save('y.npy', y.output)
np.save('dx.npy', g.grad_input)
"""
    in_venv(venv, code, server.address, cwd=tmp_path)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    want = (x - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=1e-5)
    # dy = 1 everywhere: the gradient through batch statistics is 0.
    np.testing.assert_allclose(np.load(tmp_path / "dx.npy"), 0, atol=1e-5)


def test_torch_module_from_the_wheel(venv, server, tmp_path):
    torch.manual_seed(3)
    x = torch.randn(8, 4, 3, 3)
    torch.save(x, tmp_path / "x.pt")
    code = """
import sys, torch, normserve
x = torch.load('x.pt').requires_grad_()
with normserve.Client(sys.argv[1], timeout=30) as c:
    bn = normserve.torch.BatchNorm2d(4, client=c)
    y = bn(x)
    (y * y).sum().backward()
    torch.save([y.detach(), x.grad, bn.running_mean], 'out.pt')
"""
    in_venv(venv, code, server.address, cwd=tmp_path)
    y, dx, running_mean = torch.load(tmp_path / "out.pt")
    ref = torch.nn.BatchNorm2d(4)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr * yr).sum().backward()
    torch.testing.assert_close(y, yr.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(running_mean, ref.running_mean)

