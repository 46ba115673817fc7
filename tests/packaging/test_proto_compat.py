"""The API keeps yesterday's clients working: today's proto against the
committed descriptor set of release 0.1.0 (proto/compat), the checker
against the breaks it must catch, and release 0.1.0's own generated stubs
against today's server."""

import copy
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from packaging_util import REPO, clean_env, run

CHECKER = os.path.join(REPO, "scripts", "check-proto-compat.py")
RELEASE = os.path.join(REPO, "proto", "compat", "normserve-v1-0.1.0.pb")
PROTOC = os.environ.get("NORMSERVE_PROTOC", "protoc")


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_proto_compat",
                                                  CHECKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_todays_proto_serves_release_0_1_0():
    text = run([sys.executable, CHECKER, "--protoc", PROTOC])
    assert "proto/compat/normserve-v1-0.1.0.pb: compatible" in text


def message(files, name):
    (found,) = [m for m in files.file[0].message_type if m.name == name]
    return found


def field(files, message_name, field_name):
    (found,) = [f for f in message(files, message_name).field
                if f.name == field_name]
    return found


def mutated(checker, change):
    old = checker.load_set(RELEASE)
    new = copy.deepcopy(old)
    change(new)
    return checker.compare(old, new)


def test_checker_catches_each_kind_of_break(checker):
    def remove_field(s):
        m = message(s, "ForwardRequest")
        keep = [f for f in m.field if f.name != "training"]
        del m.field[:]
        m.field.extend(keep)

    def renumber(s):
        field(s, "Tensor", "data").number = 14

    def retype(s):
        field(s, "BackwardResponse", "grad_weight").type = 1  # double

    def relabel(s):
        field(s, "Tensor", "shape").label = 1  # optional

    def remove_method(s):
        service = s.file[0].service[0]
        keep = [m for m in service.method if m.name != "GetState"]
        del service.method[:]
        service.method.extend(keep)

    def stop_streaming(s):
        (train,) = [m for m in s.file[0].service[0].method
                    if m.name == "Train"]
        train.client_streaming = False

    def renumber_enum(s):
        (dtype,) = [e for e in s.file[0].enum_type if e.name == "DType"]
        dtype.value[1].number = 9

    def remove_message(s):
        keep = [m for m in s.file[0].message_type if m.name != "SgdOptions"]
        del s.file[0].message_type[:]
        s.file[0].message_type.extend(keep)

    cases = {
        remove_field: "normserve.v1.ForwardRequest.training (field 3): "
                      "removed",
        renumber: "normserve.v1.Tensor.data (field 4): renumbered to 14",
        retype: "normserve.v1.BackwardResponse.grad_weight (field 2): type "
                "float is now double",
        relabel: "normserve.v1.Tensor.shape (field 1): repeated is now "
                 "optional",
        remove_method: "normserve.v1.Normalization.GetState: method removed",
        stop_streaming: "normserve.v1.Normalization.Train: client_streaming "
                        "changed",
        renumber_enum: "normserve.v1.DType.DTYPE_FLOAT32 (= 1): renumbered "
                       "to 9",
        remove_message: "normserve.v1.SgdOptions: message removed",
    }
    for change, want in cases.items():
        problems = mutated(checker, change)
        assert want in problems, (change.__name__, problems)


def test_checker_accepts_additions(checker):
    def add(s):
        m = message(s, "Tensor")
        extra = m.field.add()
        extra.CopyFrom(m.field[0])
        extra.name, extra.number = "strides", 5
    assert mutated(checker, add) == []


def test_checker_exits_nonzero_on_a_break(checker, tmp_path):
    old = checker.load_set(RELEASE)
    field(old, "Tensor", "data").number = 15
    path = tmp_path / "fake-release.pb"
    path.write_bytes(old.SerializeToString())
    done = __import__("subprocess").run(
        [sys.executable, CHECKER, "--old", str(path), "--protoc", PROTOC],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "normserve.v1.Tensor.data (field 15): renumbered to 4" in (
        done.stdout)


def test_release_0_1_0_stubs_against_todays_server(server, tmp_path):
    stubs = os.environ["NORMSERVE_COMPAT_STUBS"]
    assert os.path.isfile(os.path.join(stubs, "normserve", "v1",
                                       "normserve_pb2.py"))
    torch.manual_seed(11)
    x = torch.randn(6, 3, 4, 4)
    g = torch.randn(6, 3, 4, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "g.npy", g.numpy())
    got = json.loads(run(
        [sys.executable, os.path.join(os.path.dirname(__file__),
                                      "old_release_client.py"),
         server.address, "old-release", str(tmp_path / "x.npy"),
         str(tmp_path / "g.npy")],
        cwd=tmp_path, env=clean_env(PYTHONPATH=stubs)))

    ref = torch.nn.BatchNorm2d(3, momentum=0.1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    xr = x.clone().requires_grad_()
    y = ref(xr)
    y.backward(g)
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(got["output"]), y.detach(),
                               **close)
    torch.testing.assert_close(torch.tensor(got["grad_input"]), xr.grad,
                               **close)
    torch.testing.assert_close(torch.tensor(got["grad_weight"]),
                               ref.weight.grad, **close)
    torch.testing.assert_close(torch.tensor(got["grad_bias"]),
                               ref.bias.grad, **close)
    opt.step()
    ref.eval()
    with torch.no_grad():
        want_eval = ref(x)
    torch.testing.assert_close(torch.tensor(got["eval_output"]), want_eval,
                               **close)
    assert got["state_keys"] == sorted(ref.state_dict().keys())
    for key in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(torch.tensor(got["state"][key]),
                                   ref.state_dict()[key], **close)
    assert got["copy_num_batches_tracked"] == 1
    assert got["stream_request_id"] == 7 and got["stream_ok"]
    torch.testing.assert_close(torch.tensor(got["stream_output"]), want_eval,
                               **close)
