#!/usr/bin/python3
"""The real normserve binary's command line against server/flags.cc.

usage: flags_test.py PATH/normserve PATH/server/flags.cc

  - `--help` (and -h) exits 0 and lists exactly the flags that flags.cc
    declares with ABSL_FLAG, each with its declared help text and default,
    and no flag of another file (--helpfull's other flags, absl's own);
  - an unknown flag, a missing value and a bad value exit 2 with
    "normserve: ..." messages (every ranged flag names its minimum);
  - `--flag=value` and `--flag value` both set flags: the start-up output
    shows the values, and SIGTERM exits 0 after draining.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile

FAILURES = []

# Abseil's own flags (absl/flags/parse.cc, usage.cc): never in --help.
ABSL_FLAGS = {"flagfile", "fromenv", "tryfromenv", "undefok", "help",
              "helpfull", "helpshort", "helppackage", "helpon", "helpmatch",
              "version", "only_check_args"}


def check(ok, message):
    if not ok:
        FAILURES.append(message)
        print(f"FAIL: {message}", flush=True)
    return ok


def run(server, *args):
    proc = subprocess.run([server, *args], capture_output=True, text=True,
                          timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


def c_string(literals):
    """The value of adjacent C++ string literals."""
    return "".join(bytes(s, "utf-8").decode("unicode_escape")
                   for s in re.findall(r'"((?:[^"\\]|\\.)*)"', literals))


def declarations(source):
    """{name: (type, default as --help prints it, help)} from ABSL_FLAG."""
    text = open(source, encoding="utf-8").read()
    flags = {}
    literal = r'"(?:[^"\\]|\\.)*"'
    pattern = re.compile(
        rf"ABSL_FLAG\(\s*([\w:<>]+)\s*,\s*(\w+)\s*,\s*({literal}|[\w:]+)"
        rf"\s*,\s*((?:{literal}\s*)+)\)\s*;")
    for m in pattern.finditer(text):
        type_, name, default, help_ = m.groups()
        if default.startswith('"'):
            default = c_string(default) or "none"
        elif "::k" in default:  # An enumerator: FsyncPolicy::kAlways.
            default = default.rsplit("::k", 1)[1].lower()
        flags[name] = (type_, default, " ".join(c_string(help_).split()))
    check(text.count("ABSL_FLAG(") == len(flags),
          f"{source}: parsed {len(flags)} of {text.count('ABSL_FLAG(')} "
          "ABSL_FLAG declarations")
    return flags


def listed(usage):
    """[(name, help text, default)] of the flags a usage text lists."""
    entries = []
    for m in re.finditer(r"^  --(\w+)(.*(?:\n {26}.*)*)", usage, re.M):
        text = " ".join(m.group(2).split())
        d = re.fullmatch(r"(.*) \(default: (.*)\)", text)
        entries.append((m.group(1), d.group(1) if d else text,
                        d.group(2) if d else None))
    return entries


def test_help(server, declared):
    rc, out, err = run(server, "--help")
    check(rc == 0 and not err, f"--help: exit {rc}, stderr {err!r}")
    check(out.startswith("usage: normserve"), "--help: no usage line")
    check("TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES" in out,
          "--help: no environment note")
    # --help and --version are the parser's own, not flags.cc's.
    entries = [e for e in listed(out) if e[0] not in ("help", "version")]
    names = [e[0] for e in entries]
    check(names == sorted(declared),
          f"--help lists {names}, flags.cc declares {sorted(declared)}")
    for name, help_, default in entries:
        if name not in declared:
            continue
        _, want_default, want_help = declared[name]
        check(default == want_default,
              f"--{name}: --help says default {default}, declared "
              f"{want_default}")
        check(help_ == want_help,
              f"--{name}: --help says {help_!r}, declared {want_help!r}")
    check(not set(names) & ABSL_FLAGS, f"--help lists absl's flags "
          f"{sorted(set(names) & ABSL_FLAGS)}")
    check("absl/" not in out and "Flags from" not in out,
          "--help shows absl's flag listing")
    check(run(server, "-h") == (rc, out, err), "-h differs from --help")
    rc, version, err = run(server, "--version")
    check(rc == 0 and not err and re.fullmatch(r"normserve \d+\.\d+\.\d+\n",
                                               version),
          f"--version: exit {rc}, {version!r}, stderr {err!r}")

    # --helpfull: every flag registered in the binary; those not declared in
    # flags.cc are not in --help, and cannot be set.
    rc, full, err = run(server, "--helpfull")
    check(rc == 0 and not err, f"--helpfull: exit {rc}, stderr {err!r}")
    full_names = {e[0] for e in listed(full)}
    check(full_names >= set(names), "--helpfull lacks flags --help lists")
    for other in sorted((full_names - set(declared) - {"help"}) | ABSL_FLAGS):
        check(other not in names, f"--help lists --{other}, not ours")
        if other not in ("help", "helpfull"):
            rc, _, err = run(server, f"--{other}=1")
            check(rc == 2 and "unknown flag" in err,
                  f"--{other}=1: exit {rc}, {err!r}")
    print(f"--help: {len(names)} flags, as declared; --helpfull: "
          f"{len(full_names - set(declared) - {'help'})} others")


def test_errors(server, declared):
    def expect(args, message):
        rc, out, err = run(server, *args)
        check(rc == 2 and err == f"normserve: {message}\n" and not out,
              f"{args}: exit {rc}, stderr {err!r}, want 2 and "
              f"'normserve: {message}'")

    expect(["--bogus"], "unknown flag --bogus (see --help)")
    expect(["--bogus=1"], "unknown flag --bogus=1 (see --help)")
    expect(["--device=cpu", "stray"], "unknown flag stray (see --help)")
    expect(["-address=x"], "unknown flag -address=x (see --help)")
    expect(["--address"], "--address needs a value")
    expect(["--max_layers"], "--max_layers needs a value")
    expect(["--fsync=never"], "--fsync never: expected always or interval")
    expect(["--fsync", "sometimes"],
           "--fsync sometimes: expected always or interval")
    ranged = {name: int(re.fullmatch(r"AtLeast<(\d+)>", t).group(1))
              for name, (t, _, _) in declared.items()
              if t.startswith("AtLeast<")}
    check(len(ranged) >= 10, f"only {len(ranged)} ranged flags parsed")
    for name, low in sorted(ranged.items()):
        message = f"expected an integer >= {low}"
        expect([f"--{name}=abc"], f"--{name} abc: {message}")
        expect([f"--{name}", str(low - 1)], f"--{name} {low - 1}: {message}")
        expect([f"--{name}=1.5"], f"--{name} 1.5: {message}")
    print(f"errors: {len(ranged)} ranged flags refuse bad values")


def test_values(server):
    """Both syntaxes reach the server: the start-up lines show them."""
    with tempfile.TemporaryDirectory() as state_dir:
        proc = subprocess.Popen(
            [server, "--address=127.0.0.1:0", "--device", "cpu",
             "--max_message_mb", "5", "--max_saved_mb=3",
             "--max_saved_contexts", "9", "--max_layers=7",
             "--state_dir", state_dir, "--fsync=interval",
             "--fsync_interval_ms", "7", "--shutdown_grace_s=1",
             "--cpu_threads", "1", "--workers=1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if "fsync=" in line:
                    break
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        except Exception:
            proc.kill()
            raise
        lines.append(out)
        out = "".join(lines)
        check(proc.returncode == 0,
              f"server exit {proc.returncode}: {out}{err}")
        check(re.search(r"^normserve listening on 127\.0\.0\.1:[1-9]\d* "
                        r"device=cpu \(1 threads[^)]*\) max_message_mb=5 "
                        r"max_saved_mb=3 max_saved_contexts=9 max_layers=7$",
                        out, re.M),
              f"start-up line does not show the flags:\n{out}")
        check(f"state_dir {state_dir}:" in out and
              "fsync=interval (7 ms)" in out,
              f"no state_dir/fsync report:\n{out}")
        check("SIGTERM received, draining (grace 1s)" in out,
              f"no drain line with --shutdown_grace_s=1:\n{out}")
    print("values: --flag=value and --flag value both set flags")


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    server, source = sys.argv[1:]
    declared = declarations(source)
    check(len(declared) >= 20, f"only {len(declared)} flags in {source}")
    test_help(server, declared)
    test_errors(server, declared)
    test_values(server)
    if FAILURES:
        raise SystemExit(f"{len(FAILURES)} failure(s)")
    print("PASS")


if __name__ == "__main__":
    main()
