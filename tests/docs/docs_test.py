#!/usr/bin/python3
"""Keeps the documentation true: its commands run, its links resolve, and it
points at nothing outside the repository.

usage:
  docs_test.py commands --source SRC --build BUILD [--ctest CTEST] [--node NODE]
  docs_test.py links --source SRC
  docs_test.py refs --source SRC [--strict]

commands (ctest docs_commands). Every fenced block of README.md and
docs/*.md is one of:
  - a command block (```sh, ```bash, ```shell, ```console, ```python,
    ```pycon, ```js): run here, in document order, against a real server
    (BUILD/bin/normserve on a free port, one per file), unless the line
    before it (blank lines aside) is a verdict:
      <!-- checked-by: NAME[, NAME...] -->  NAME is a ctest test (glob
          patterns allowed, e.g. SecurityTest.*) or "make TARGET" for a
          target that .ci/run runs or that one of those depends on;
      <!-- not-run: REASON -->  a command CI cannot run (a cluster, a GPU,
          an image build), with the reason;
      <!-- file: NAME -->  the block is written to NAME in the working
          directory, for a later command block of the same file to use.
  - any other language (```text, ```yaml, ```cpp, ...): not a command, not
    run. A fence without a language fails: say ```text.
How blocks run, in a scratch directory holding links to the source tree's
top-level entries and a build/ whose bin/ and python/ are BUILD's:
  sh/bash/shell   bash with `set -euo pipefail`; must exit 0. A block that
                  starts the server (normserve without --help or
                  --version, or make serve) runs in the background on
                  127.0.0.1:0 (every HOST:PORT in it becomes that) until
                  the server prints its start-up line; then the server
                  gets SIGTERM and the block must exit 0 with "normserve:
                  stopped".
  console         each "$ " line runs; the lines after it are its expected
                  output (in order, "..." matches anything; stdout and
                  stderr together), and the exit status may then be
                  nonzero; a command without expected output must exit 0.
  python          /usr/bin/python3, PYTHONPATH=BUILD/python:SRC/client/python.
  pycon           the same, as a doctest (ELLIPSIS, NORMALIZE_WHITESPACE).
  js              node, from the scratch directory (require('./client/node')).
In every block 127.0.0.1:50051 and localhost:50051 become the test server's
address; normserve-cli and normserve-load without --address are pointed at
it too (their default is 127.0.0.1:50051); `make` runs with `-o build`
(this test runs after the build, on what it built) and BUILD_DIR, ADDRESS
(127.0.0.1:0) and DEVICE (cpu) in the environment, so make's outputs land in
the scratch directory.

links (ctest docs_links): every relative link of every Markdown file in the
repository names a file or directory inside it, and a #fragment names a
heading of the target (GitHub's anchors).

refs (ctest docs_external_refs): no file refers to the shared folder beside
the repository or to a standalone document (an upper-case name such as
NOTES.md) the repository does not have. Such a
reference in README.md, docs/ or deploy/README.md fails; elsewhere it is a
warning, or a failure with --strict (what ctest runs).
"""
import argparse
import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SHELL = {"sh", "bash", "shell"}
CONSOLE = {"console"}
PYTHON = {"python", "py", "python3"}
PYCON = {"pycon"}
JS = {"js", "javascript", "node"}
COMMAND_LANGS = SHELL | CONSOLE | PYTHON | PYCON | JS
DEFAULT_ADDRESS = re.compile(r"\b(?:127\.0\.0\.1|localhost):50051\b")
ANY_ADDRESS = re.compile(
    r"\b(?:\d{1,3}(?:\.\d{1,3}){3}|localhost|\[::1?\]):\d+\b")
VERDICT = re.compile(r"^\s*<!--\s*(checked-by|not-run|file):\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
BLOCK_TIMEOUT_S = 300
PY = "/usr/bin/python3"

# The Markdown files whose references to outside the repository always fail.
OWNED = re.compile(r"^(README\.md|docs/.*|deploy/README\.md)$")


# --- Markdown ----------------------------------------------------------------

class Block:
    def __init__(self, path, line, lang, text, verdict):
        self.path = path          # relative to the source root
        self.line = line          # 1-based line of the opening fence
        self.lang = lang
        self.text = text
        self.verdict = verdict    # (kind, value) or None

    def where(self):
        return f"{self.path}:{self.line}"


def parse_blocks(root, rel):
    """Returns the fenced blocks of root/rel and the errors found."""
    lines = open(os.path.join(root, rel), encoding="utf-8").read().split("\n")
    blocks, errors = [], []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start = i
        verdict = None
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0:
            v = VERDICT.match(lines[j])
            if v:
                verdict = (v.group(1), v.group(2))
        body = []
        i += 1
        while i < len(lines):
            s = lines[i].strip()
            if s.startswith(fence[0] * len(fence)) and not s.strip(fence[0]):
                break
            body.append(lines[i][indent:] if lines[i][:indent].strip() == ""
                        else lines[i].lstrip())
            i += 1
        else:
            errors.append(f"{rel}:{start + 1}: fence never closed")
        i += 1
        if not lang:
            errors.append(f"{rel}:{start + 1}: fence without a language "
                          "(use ```text for output, trees and tables)")
            continue
        blocks.append(Block(rel, start + 1, lang, "\n".join(body) + "\n",
                            verdict))
    return blocks, errors


def strip_code(text):
    """Returns text without fenced blocks and inline code spans."""
    out, fence = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
            out.append("")
            continue
        if fence is not None:
            s = line.strip()
            if s.startswith(fence[0] * len(fence)) and not s.strip(fence[0]):
                fence = None
            out.append("")
            continue
        out.append(re.sub(r"`+[^`]*`+", "", line))
    return "\n".join(out)


def slug(heading):
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path):
    seen, result = {}, set()
    for line in strip_code(open(path, encoding="utf-8").read()).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        result.add(s if n == 0 else f"{s}-{n}")
    for m in re.finditer(r'<a\s+(?:name|id)="([^"]+)"',
                         open(path, encoding="utf-8").read()):
        result.add(m.group(1))
    return result


# --- the repository -----------------------------------------------------------

SKIP_DIRS = {".git", "node_modules", "__pycache__", ".cache", "Testing"}


def repo_files(root):
    """Every file of the repository (git's view when there is one)."""
    try:
        out = subprocess.run(
            ["git", "-C", root, "ls-files", "-co", "--exclude-standard", "-z"],
            capture_output=True, check=True, timeout=60).stdout
        files = [f for f in out.decode().split("\0") if f]
        return sorted(f for f in files if os.path.isfile(os.path.join(root, f)))
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and
                       not (rel == "." and d.startswith("build"))]
        for f in filenames:
            files.append(os.path.normpath(os.path.join(rel, f)))
    return sorted(files)


def read_text(path):
    try:
        data = open(path, "rb").read()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def doc_files(root):
    docs = ["README.md"]
    ddir = os.path.join(root, "docs")
    if os.path.isdir(ddir):
        docs += sorted(os.path.join("docs", f) for f in os.listdir(ddir)
                       if f.endswith(".md"))
    return docs


# --- verdicts -----------------------------------------------------------------

def ctest_names(ctest, build):
    out = subprocess.run([ctest, "-N"], cwd=build, capture_output=True,
                         text=True, timeout=120)
    names = re.findall(r"^\s*Test\s+#\d+:\s+(.+?)\s*$", out.stdout, re.M)
    if not names:
        raise SystemExit(f"docs: `{ctest} -N` in {build} listed no tests:\n"
                         + out.stdout + out.stderr)
    return names


def ci_make_targets(root):
    """Targets .ci/run makes, and every target they depend on."""
    ci = open(os.path.join(root, ".ci", "run"), encoding="utf-8").read()
    wanted = []
    for m in re.finditer(r"^\s*make\b([^\n#;&|]*)", ci, re.M):
        words = [w for w in m.group(1).split()
                 if "=" not in w and not w.startswith("-")]
        wanted += words or ["all"]
    deps = {}
    for line in open(os.path.join(root, "Makefile"), encoding="utf-8"):
        if line.startswith(("\t", "#", ".")) or ":=" in line or "?=" in line:
            continue
        m = re.match(r"^([\w.-]+(?:\s+[\w.-]+)*)\s*:(?!=)\s*(.*)$", line)
        if m:
            for t in m.group(1).split():
                deps.setdefault(t, []).extend(m.group(2).split())
    closure, todo = set(), list(wanted)
    while todo:
        t = todo.pop()
        if t not in closure:
            closure.add(t)
            todo += deps.get(t, [])
    return set(wanted), closure


def check_verdict(block, tests, make_closure):
    """Returns an error for a checked-by verdict naming nothing real."""
    kind, value = block.verdict
    if kind == "not-run":
        return None if value else "not-run without a reason"
    if kind == "file":
        return None if value and "/" not in value else \
            "file: needs a plain file name"
    errors = []
    for name in [n.strip() for n in value.split(",")]:
        if not name:
            errors.append("empty name")
        elif name.startswith("make "):
            target = name[len("make "):].strip()
            if target not in make_closure:
                errors.append(f"'{name}': .ci/run does not make {target}")
        elif not fnmatch.filter(tests, name):
            errors.append(f"'{name}' is no ctest test")
    return "; ".join(errors) or None


# --- running ------------------------------------------------------------------

def shell_commands(text):
    """Command lines of a shell block: continuations joined, comments cut."""
    commands, current = [], ""
    for raw in text.split("\n"):
        line = raw.rstrip()
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        commands.append(current.strip())
        current = ""
    if current.strip():
        commands.append(current.strip())
    return commands


def starts_server(text):
    for command in shell_commands(text):
        words = command.split()
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words.pop(0)
        if not words or "--help" in words or "--version" in words:
            continue
        if words[0] == "normserve" or words[0].endswith("/normserve"):
            return True
        if words[0] == "make" and "serve" in words[1:]:
            return True
    return False


def process_group_members(pgid, name):
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if comm == name and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def wait_for(pred, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def tail(text, n=40):
    lines = text.rstrip("\n").split("\n")
    return "\n".join("    | " + l for l in lines[-n:])


class Session:
    """One document's scratch directory and server."""

    def __init__(self, root, build, node):
        self.root, self.build, self.node = root, build, node
        self.dir = tempfile.mkdtemp(prefix="normserve-docs-")
        self.server = None
        self.address = None
        self.server_log = os.path.join(self.dir, ".server.log")
        for entry in os.listdir(root):
            if entry in SKIP_DIRS or entry.startswith("build"):
                continue
            os.symlink(os.path.join(root, entry), os.path.join(self.dir, entry))
        self.bin = os.path.join(self.dir, "build", "bin")
        os.makedirs(self.bin)
        os.symlink(os.path.join(build, "python"),
                   os.path.join(self.dir, "build", "python"))
        self.real_bin = os.path.join(build, "bin")
        for f in os.listdir(self.real_bin):
            os.symlink(os.path.join(self.real_bin, f), os.path.join(self.bin, f))
        tools = os.path.join(self.dir, ".tools")
        os.makedirs(tools)
        real_make = shutil.which("make") or "/usr/bin/make"
        self.write_script(os.path.join(tools, "make"),
                          f'exec {real_make} -o build "$@"\n')
        self.env = dict(os.environ)
        self.env.update({
            "PATH": f"{tools}:{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "BUILD_DIR": os.path.join(self.dir, "build"),
            "ADDRESS": "127.0.0.1:0",
            "DEVICE": "cpu",
            "NORMSERVE_SERVER": os.path.join(self.real_bin, "normserve"),
            "PYTHONPATH": os.path.join(build, "python") + ":" +
                          os.path.join(root, "client", "python"),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        if node:
            self.env["PATH"] += ":" + os.path.dirname(node)

    @staticmethod
    def write_script(path, body):
        with open(path, "w") as f:
            f.write("#!/bin/bash\n" + body)
        os.chmod(path, 0o755)

    def start_server(self):
        if self.server is not None:
            return
        log = open(self.server_log, "w")
        self.server = subprocess.Popen(
            [os.path.join(self.real_bin, "normserve"), "--address=127.0.0.1:0",
             "--device=cpu", "--shutdown_grace_s=5"],
            cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)

        def listening():
            m = re.search(r"^normserve listening on (\S+)",
                          open(self.server_log).read(), re.M)
            if m:
                self.address = m.group(1)
            return m is not None or self.server.poll() is not None
        wait_for(listening, 30)
        if self.address is None:
            raise RuntimeError("the test server did not start:\n" +
                               tail(open(self.server_log).read()))
        self.env["NORMSERVE_ADDRESS"] = self.address
        # normserve-cli and normserve-load default to 127.0.0.1:50051: point
        # them at this server when a command names no --address.
        for tool in ("normserve-cli", "normserve-load"):
            link = os.path.join(self.bin, tool)
            if not os.path.lexists(link):
                continue
            os.remove(link)
            self.write_script(link, (
                'for a in "$@"; do case $a in --address|--address=*) '
                f'exec {self.real_bin}/{tool} "$@";; esac; done\n'
                f'exec {self.real_bin}/{tool} --address={self.address} "$@"\n'))

    def stop_server(self):
        """Stops the server with SIGTERM; returns an error or None."""
        if self.server is None:
            return None
        self.server.send_signal(signal.SIGTERM)
        try:
            rc = self.server.wait(30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
            return "the test server did not stop within 30 s of SIGTERM"
        self.server = None
        if rc != 0:
            return (f"the test server exited {rc} on SIGTERM:\n" +
                    tail(open(self.server_log).read()))
        return None

    def close(self):
        error = self.stop_server()
        shutil.rmtree(self.dir, ignore_errors=True)
        return error

    def substitute(self, text):
        return DEFAULT_ADDRESS.sub(self.address, text) if self.address else text

    def run(self, argv, stdin=None, timeout=BLOCK_TIMEOUT_S):
        try:
            p = subprocess.run(argv, cwd=self.dir, env=self.env, input=stdin,
                               capture_output=True, text=True, timeout=timeout)
            return p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            if isinstance(out, bytes):
                out = out.decode(errors="replace")
            return None, out + f"\n(timed out after {timeout} s)"

    # Each returns None when the block passed, else what went wrong.

    def run_shell(self, block):
        self.start_server()
        script = "set -euo pipefail\n" + self.substitute(block.text)
        rc, out = self.run(["bash", "-c", script])
        return None if rc == 0 else f"exited {rc}:\n{tail(out)}"

    def run_server_block(self, block):
        script = "set -euo pipefail\n" + ANY_ADDRESS.sub("127.0.0.1:0",
                                                         block.text)
        log_path = os.path.join(self.dir, ".block.log")
        with open(log_path, "w") as log:
            p = subprocess.Popen(["bash", "-c", script], cwd=self.dir,
                                 env=self.env, stdout=log,
                                 stderr=subprocess.STDOUT,
                                 start_new_session=True)
        output = lambda: open(log_path).read()  # noqa: E731
        try:
            wait_for(lambda: "normserve listening on" in output() or
                     p.poll() is not None, 60)
            if p.poll() is not None:
                return f"exited {p.returncode} before serving:\n{tail(output())}"
            if "normserve listening on" not in output():
                return f"printed no start-up line in 60 s:\n{tail(output())}"
            servers = process_group_members(p.pid, "normserve")
            if not servers:
                return "no normserve process found in the block's group"
            for pid in servers:
                os.kill(pid, signal.SIGTERM)
            try:
                rc = p.wait(30)
            except subprocess.TimeoutExpired:
                return f"did not exit 30 s after SIGTERM:\n{tail(output())}"
            if rc != 0:
                return f"exited {rc} after SIGTERM:\n{tail(output())}"
            if "normserve: stopped" not in output():
                return f"the server did not say it stopped:\n{tail(output())}"
            return None
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def run_console(self, block):
        self.start_server()
        steps, current = [], None
        for line in self.substitute(block.text).split("\n"):
            if line.startswith("$ "):
                current = [line[2:], []]
                steps.append(current)
            elif current is not None and current[0].endswith("\\") and \
                    not current[1]:
                current[0] = current[0][:-1] + " " + line.strip()
            elif current is not None and line.strip():
                current[1].append(line.strip())
        if not steps:
            return "a console block without a '$ ' command"
        for command, expected in steps:
            rc, out = self.run(["bash", "-c", "set -o pipefail\n" + command])
            if rc is None:
                return f"'{command}' {out.strip().splitlines()[-1]}"
            if not expected:
                if rc != 0:
                    return f"'{command}' exited {rc}:\n{tail(out)}"
                continue
            got = [l.strip() for l in out.split("\n")]
            k = 0
            for want in expected:
                pattern = re.compile(
                    "^" + ".*".join(map(re.escape, want.split("..."))) + "$")
                while k < len(got) and not pattern.match(got[k]):
                    k += 1
                if k == len(got):
                    return (f"'{command}' (exit {rc}) printed no line like "
                            f"'{want}' (in order):\n{tail(out)}")
                k += 1
        return None

    def run_python(self, block):
        self.start_server()
        rc, out = self.run([PY, "-"], stdin=self.substitute(block.text))
        return None if rc == 0 else f"exited {rc}:\n{tail(out)}"

    def run_pycon(self, block):
        self.start_server()
        runner = (
            "import doctest, sys\n"
            "text = sys.stdin.read()\n"
            "test = doctest.DocTestParser().get_doctest(text, {}, 'block', "
            "None, 0)\n"
            "r = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | "
            "doctest.NORMALIZE_WHITESPACE)\n"
            "r.run(test)\n"
            "sys.exit(1 if r.failures or not r.tries else 0)\n")
        rc, out = self.run([PY, "-c", runner], stdin=self.substitute(block.text))
        return None if rc == 0 else f"doctest failed:\n{tail(out, 60)}"

    def run_js(self, block):
        self.start_server()
        if not self.node:
            return "no node found (install nodejs; scripts/install-deps.sh)"
        rc, out = self.run([self.node, "-"], stdin=self.substitute(block.text))
        return None if rc == 0 else f"exited {rc}:\n{tail(out)}"

    def write_file(self, block):
        self.start_server()
        name = block.verdict[1]
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(self.substitute(block.text))


def commands(args):
    root, build = os.path.abspath(args.source), os.path.abspath(args.build)
    tests = ctest_names(args.ctest, build)
    ci_targets, make_closure = ci_make_targets(root)
    print(f"docs: {len(tests)} ctest tests; .ci/run makes "
          f"{', '.join(sorted(ci_targets))} (with "
          f"{', '.join(sorted(make_closure - ci_targets))})")
    print("docs: 127.0.0.1:50051 is the test server's address; "
          "normserve-cli/normserve-load without --address reach it; "
          "make runs with -o build")
    failures, counts = [], {"ran": 0, "covered": 0, "not run": 0, "file": 0,
                            "other": 0}
    for rel in doc_files(root):
        blocks, errors = parse_blocks(root, rel)
        for e in errors:
            print(f"FAIL     {e}")
            failures.append(e)
        pending_files = {}
        session = None
        try:
            for b in blocks:
                tag = f"{b.where():<24} {b.lang:<7}"
                if b.verdict is not None:
                    error = check_verdict(b, tests, make_closure)
                    if error:
                        print(f"FAIL     {tag} {b.verdict[0]}: {error}")
                        failures.append(f"{b.where()}: {error}")
                        continue
                kind = b.verdict[0] if b.verdict else "run"
                if b.lang not in COMMAND_LANGS and kind != "file":
                    counts["other"] += 1
                    continue
                if kind == "checked-by":
                    counts["covered"] += 1
                    print(f"COVERED  {tag} by {b.verdict[1]}")
                    continue
                if kind == "not-run":
                    counts["not run"] += 1
                    print(f"NOT RUN  {tag} {b.verdict[1]}")
                    continue
                if session is None:
                    session = Session(root, build, args.node)
                if kind == "file":
                    session.write_file(b)
                    pending_files[b.verdict[1]] = b
                    counts["file"] += 1
                    continue
                for name in [n for n in pending_files if n in b.text]:
                    print(f"FILE     {pending_files.pop(name).where():<24} "
                          f"written to {name}, used by {b.where()}")
                started = time.monotonic()
                if b.lang in SHELL and starts_server(b.text):
                    error = session.run_server_block(b)
                    what = "server started and stopped"
                elif b.lang in SHELL:
                    error = session.run_shell(b)
                    what = "exit 0"
                elif b.lang in CONSOLE:
                    error = session.run_console(b)
                    what = "output as shown"
                elif b.lang in PYTHON:
                    error = session.run_python(b)
                    what = "exit 0"
                elif b.lang in PYCON:
                    error = session.run_pycon(b)
                    what = "doctest passed"
                else:
                    error = session.run_js(b)
                    what = "exit 0"
                seconds = time.monotonic() - started
                if error:
                    print(f"FAIL     {tag} {error}")
                    failures.append(
                        f"{b.where()}: {error.splitlines()[0].rstrip(':')}")
                else:
                    counts["ran"] += 1
                    print(f"RAN      {tag} {what} ({seconds:.1f} s)")
            for name, b in pending_files.items():
                msg = f"{b.where()}: written to {name}, which no later block uses"
                print(f"FAIL     {msg}")
                failures.append(msg)
        except RuntimeError as e:
            print(f"FAIL     {rel}: {e}")
            failures.append(f"{rel}: {str(e).splitlines()[0]}")
        finally:
            if session is not None:
                error = session.close()
                if error:
                    print(f"FAIL     {rel}: {error}")
                    failures.append(f"{rel}: {error.splitlines()[0]}")
    print(f"docs: {counts['ran']} blocks ran, {counts['covered']} covered by "
          f"tests or CI make targets, {counts['not run']} not run (reasons "
          f"above), {counts['file']} written as files, {counts['other']} "
          f"not commands")
    if failures:
        print(f"docs: {len(failures)} FAILED:")
        for f in failures:
            print(f"  {f}")
        return 1
    return 0


# --- links ----------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)


def links(args):
    root = os.path.realpath(args.source)
    failures, checked = [], 0
    for rel in repo_files(root):
        if not rel.endswith(".md"):
            continue
        path = os.path.join(root, rel)
        text = strip_code(open(path, encoding="utf-8").read())
        targets = [m.group(1) for m in LINK.finditer(text)]
        targets += [m.group(1) for m in REF_LINK.finditer(text)]
        for target in targets:
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue  # https:, mailto:, ...
            checked += 1
            file_part, _, fragment = target.partition("#")
            dest = path if not file_part else os.path.realpath(
                os.path.join(os.path.dirname(path), file_part))
            where = f"{rel}: ({target})"
            if not (dest == root or dest.startswith(root + os.sep)):
                failures.append(f"{where} points outside the repository")
            elif not os.path.exists(dest):
                failures.append(f"{where}: no such file")
            elif fragment and dest.endswith(".md") and \
                    fragment not in anchors(dest):
                failures.append(f"{where}: no heading with anchor #{fragment}")
    for f in failures:
        print(f"FAIL  {f}")
    print(f"docs: {checked} relative links checked, {len(failures)} broken")
    return 1 if failures else 0


# --- references outside the repository -------------------------------------------

# Spelled in pieces so that this file does not match itself.
SHARED = re.compile(r"(?:\.\./|/work/)" + "shared" + r"\b")
# A standalone document's name: an upper-case stem, as in README.md.
MD_NAME = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Z][A-Z0-9_-]*\.md)\b")


def refs(args):
    root = os.path.realpath(args.source)
    files = repo_files(root)
    md_names = {os.path.basename(f) for f in files if f.endswith(".md")}
    md_paths = {f for f in files if f.endswith(".md")}
    errors, warnings = [], []
    for rel in files:
        text = read_text(os.path.join(root, rel))
        if text is None:
            continue
        for n, line in enumerate(text.split("\n"), 1):
            found = [m.group(0) for m in SHARED.finditer(line)]
            for m in MD_NAME.finditer(line):
                name = m.group(1)
                if os.path.basename(name) in md_names:
                    continue
                if os.path.normpath(os.path.join(os.path.dirname(rel),
                                                 name)) in md_paths:
                    continue
                found.append(name)
            for what in found:
                entry = f"{rel}:{n}: {what}: {line.strip()[:120]}"
                (errors if OWNED.match(rel) or args.strict
                 else warnings).append(entry)
    for w in warnings:
        print(f"WARNING  {w}")
    for e in errors:
        print(f"FAIL     {e}")
    print(f"docs: {len(files)} files scanned; references to files outside "
          f"the repository: {len(errors)} failing, {len(warnings)} warnings"
          + ("" if args.strict else
             " (outside README.md, docs/ and deploy/README.md; "
             "-DNORMSERVE_DOCS_STRICT_REFS=ON makes them fail)"))
    return 1 if errors else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("commands")
    c.add_argument("--source", required=True)
    c.add_argument("--build", required=True)
    c.add_argument("--ctest", default="ctest")
    c.add_argument("--node", default=shutil.which("node"))
    lk = sub.add_parser("links")
    lk.add_argument("--source", required=True)
    r = sub.add_parser("refs")
    r.add_argument("--source", required=True)
    r.add_argument("--strict", action="store_true")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    return {"commands": commands, "links": links, "refs": refs}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
