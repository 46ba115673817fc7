"""A state directory written by the release before the layer-kind change
(fixtures/v1, made by make_fixture.py with that release) loads in today's
server bit for bit: every layer's info and state, the request ids it
remembers, the gradients it holds (read by an optimizer step), all as that
release served them (fixtures/v1/expected.json). Then once more after a
restart, from the snapshot today's server wrote in its own format."""
import json
import os
import shutil
import sys
import tempfile

import common
import make_fixture

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "fixtures", "v1")


def compare(label, got, want):
    if got == want:
        return
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            print(f"{label}: {key}:\n  got  {got.get(key)}\n  want "
                  f"{want.get(key)}", file=sys.stderr)
    raise AssertionError(f"{label} differs from what the old release served")


def main():
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)
    tmp = tempfile.mkdtemp(prefix="normserve-fixture-")
    try:
        state_dir = os.path.join(tmp, "state")
        shutil.copytree(os.path.join(FIXTURE, "state"), state_dir)
        extra = ["--auth_tokens", os.path.join(FIXTURE, "tokens")]
        port = common.free_port()
        server = common.Server(port, state_dir, extra)
        assert common.find(r"6 layer\(s\) restored", server.output()), \
            server.output()
        assert "WARNING" not in server.output(), server.output()
        channel, stub = common.stub(port)
        compare("layers", make_fixture.dump(stub), expected["layers"])
        channel.close()
        server.stop()
        # The start rewrote the snapshot in today's format: load that too.
        server = common.Server(port, state_dir, extra)
        assert "WARNING" not in server.output(), server.output()
        channel, stub = common.stub(port)
        compare("layers after a restart", make_fixture.dump(stub),
                expected["layers"])
        compare("replays", make_fixture.replays(stub), expected["replays"])
        compare("layers after the replays", make_fixture.dump(stub),
                expected["after_replays"])
        channel.close()
        server.stop()
        print("fixture_test: fixtures/v1 loads bit for bit "
              f"({len(expected['layers'])} layers)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
