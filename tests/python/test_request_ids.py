"""request_id, expected_version and retries through normserve.Client against
the real server with --state_dir, across restarts."""

import shutil
import tempfile

import grpc
import numpy as np
import pytest

import normserve
from normserve_pytest import ServerProcess


class DurableServer:
    """A server on a state directory that a test can restart."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="normserve-rid-")
        self.process = None
        self.client = None
        self.start()

    def start(self):
        self.process = ServerProcess(
            args=["--device=cpu", "--cpu_threads=1", "--workers=2",
                  f"--state_dir={self.dir}"]).start()
        self.client = normserve.Client(self.process.address, timeout=20)

    def restart(self):
        self.stop()
        self.start()
        return self.client

    def stop(self):
        self.client.close()  # An open channel delays the drain.
        code = self.process.stop()
        assert code == 0, f"exit {code}:\n{self.process.logs()}"

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def durable():
    server = DurableServer()
    yield server
    server.close()


def test_new_request_id_is_fresh_hex():
    a, b = normserve.new_request_id(), normserve.new_request_id()
    assert len(a) == 32 and int(a, 16) >= 0 and a != b


def test_retry_with_the_same_id_returns_the_first_result(durable):
    client = durable.client
    client.create_layer(2, layer_id="bn")
    first = client.update_running_stats("bn", [1, 2], [3, 4], 4,
                                        request_id="stats-1")
    assert (first.version, first.num_batches_tracked) == (2, 1)
    again = client.update_running_stats("bn", [1, 2], [3, 4], 4,
                                        request_id="stats-1")
    assert again == first
    assert client.get_layer("bn").version == 2  # Nothing changed.

    assert client.set_parameters("bn", weight=[0.5, 0.25],
                                 request_id="set-1") == 3
    assert client.set_parameters("bn", weight=[9, 9],
                                 request_id="set-1") == 3
    np.testing.assert_array_equal(client.get_state("bn")["weight"],
                                  [0.5, 0.25])

    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    client.forward("bn", x, training=True, save_for_backward=False,
                   request_id="fwd-1")
    with pytest.raises(normserve.AlreadyExistsError) as err:
        client.forward("bn", x, training=True, request_id="fwd-1")
    assert "already applied" in err.value.details
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    state = client.get_state("bn")
    assert (state.version, int(state["num_batches_tracked"])) == (4, 2)

    # The ids are in the state directory: the retries after a restart
    # still return the first results and change nothing.
    client = durable.restart()
    again = client.update_running_stats("bn", [1, 2], [3, 4], 4,
                                        request_id="stats-1")
    assert (again.version, again.num_batches_tracked) == (2, 1)
    assert client.set_parameters("bn", weight=[9, 9],
                                 request_id="set-1") == 3
    with pytest.raises(normserve.AlreadyExistsError):
        client.forward("bn", x, training=True, request_id="fwd-1")
    after = client.get_state("bn")
    assert after.version == 4
    for key in state:
        np.testing.assert_array_equal(after[key], state[key], err_msg=key)

    # One id, one operation.
    with pytest.raises(normserve.AlreadyExistsError) as err:
        client.set_parameters("bn", bias=[1, 1], request_id="stats-1")
    assert "another operation" in err.value.details


def test_stale_expected_version_is_failed_precondition(durable):
    client = durable.client
    version = client.create_layer(2, layer_id="bn").version
    assert client.set_parameters("bn", bias=[1, 2],
                                 expected_version=version) == version + 1
    with pytest.raises(normserve.FailedPreconditionError) as err:
        client.set_parameters("bn", bias=[3, 4], expected_version=version)
    assert (f"layers/bn is at version {version + 1}; the request expected "
            f"version {version}") in err.value.details
    assert client.get_layer("bn").version == version + 1
    np.testing.assert_array_equal(client.get_state("bn")["bias"], [1, 2])
    with pytest.raises(normserve.FailedPreconditionError):
        client.optimizer_step("bn", lr=0.1, expected_version=0)
    with pytest.raises(normserve.FailedPreconditionError):
        client.load_state("bn", client.get_state("bn"),
                          expected_version=version)
    with pytest.raises(normserve.FailedPreconditionError):
        client.forward("bn", np.ones((3, 2), np.float32), training=True,
                       expected_version=version)
    # And on a Train stream.
    with client.train() as stream:
        with pytest.raises(normserve.FailedPreconditionError):
            stream.set_parameters("bn", bias=[5, 6],
                                  expected_version=version)
        assert stream.set_parameters("bn", bias=[5, 6],
                                     expected_version=version + 1) == (
                                         version + 2)
        rid = normserve.new_request_id()
        first = stream.update_running_stats("bn", [0, 0], [1, 1], 2,
                                            request_id=rid)
        assert stream.update_running_stats("bn", [0, 0], [1, 1], 2,
                                           request_id=rid) == first


def test_retried_create_and_delete_are_idempotent(durable):
    client = durable.client
    made = client.create_layer(3, request_id="make-1")  # Server-chosen id.
    assert client.create_layer(3, request_id="make-1").name == made.name
    assert [l.name for l in client.all_layers()] == [made.name]
    with pytest.raises(normserve.AlreadyExistsError) as err:
        client.create_layer(4, request_id="make-1")
    assert "another config" in err.value.details

    client.create_layer(2, layer_id="named", request_id="make-2")
    with pytest.raises(normserve.AlreadyExistsError):
        client.create_layer(2, layer_id="named")  # No id: taken, as ever.
    client = durable.restart()
    assert client.create_layer(3, request_id="make-1").name == made.name
    assert client.create_layer(2, layer_id="named",
                               request_id="make-2").name == "layers/named"
    assert len(client.all_layers()) == 2

    client.delete_layer("named", request_id="drop-1")
    client.delete_layer("named", request_id="drop-1")  # A retry: OK.
    with pytest.raises(normserve.NotFoundError):
        client.delete_layer("named")
    client.create_layer(2, layer_id="named")  # A new layer of that name.
    client = durable.restart()
    client.delete_layer("named", request_id="drop-1")
    assert client.get_layer("named").name == "layers/named"  # Still there.
    with pytest.raises(normserve.AlreadyExistsError) as err:
        client.create_layer(2, layer_id="named", request_id="make-2")
    assert "deleted since" in err.value.details


def test_retries_resend_a_lost_reply_with_the_same_id(durable, monkeypatch):
    client = durable.client
    client.create_layer(2, layer_id="bn")
    sent = []
    real_call = client._call

    def lose_first_reply(callable_, request, method, timeout):
        # The call reaches the server and is applied; its reply is lost.
        sent.append(request)
        result = real_call(callable_, request, method, timeout)
        if len(sent) == 1:
            raise normserve.UnavailableError(grpc.StatusCode.UNAVAILABLE,
                                             "reply lost", method)
        return result

    monkeypatch.setattr(client, "_call", lose_first_reply)
    result = client.update_running_stats("bn", [1, 1], [2, 2], 4, retries=2)
    assert len(sent) == 2 and sent[0].request_id == sent[1].request_id != ""
    assert (result.version, result.num_batches_tracked) == (2, 1)
    assert client.get_layer("bn").num_batches_tracked == 1  # Applied once.

    # Without retries the lost reply surfaces; nothing is sent again.
    sent.clear()
    with pytest.raises(normserve.UnavailableError):
        client.set_parameters("bn", bias=[1, 1])
    assert len(sent) == 1

    # Non-retryable errors are not retried.
    sent.clear()
    monkeypatch.setattr(client, "_call", real_call)
    with pytest.raises(normserve.FailedPreconditionError):
        client.optimizer_step("bn", lr=0.1, retries=3)  # No gradients.
    with pytest.raises(ValueError):
        client.set_parameters("bn", bias=[1, 1], request_id="x" * 129)


def test_retries_give_up_when_the_server_stays_away():
    client = normserve.Client("127.0.0.1:1", timeout=2)
    with pytest.raises(normserve.UnavailableError):
        client.create_layer(2, retries=2)
    client.close()
