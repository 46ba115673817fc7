#!/usr/bin/python3
"""Checks that the API proto still serves the clients of an older release.

    scripts/check-proto-compat.py [--old FILE.pb] [--new FILE.proto]

--old is a FileDescriptorSet of the released API (default: every
proto/compat/*.pb), --new the proto to check (default:
proto/normserve/v1/normserve.proto, compiled with protoc). Exit status 0 when
nothing an old client relies on changed; 1 with one line per break:

- a message, enum or service of the release is gone;
- a field is gone, renumbered (its name now has another number, or its
  number another name), or changed its type, its message/enum type, its
  label (optional/repeated) or its oneof;
- an enum value is gone or renumbered;
- a method is gone, or changed its request or response type or streaming.

Additions (fields, messages, methods, enum values) are always fine.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPE_NAMES = {v: k[len("TYPE_"):].lower()
              for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}
LABEL_NAMES = {v: k[len("LABEL_"):].lower()
               for k, v in descriptor_pb2.FieldDescriptorProto.Label.items()}


def load_set(path):
    files = descriptor_pb2.FileDescriptorSet()
    with open(path, "rb") as f:
        files.ParseFromString(f.read())
    return files


def compile_proto(proto, protoc="protoc"):
    """FileDescriptorSet of `proto` (a path under a proto root)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(proto))))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "new.pb")
        subprocess.run([protoc, f"--proto_path={root}",
                        f"--descriptor_set_out={out}",
                        os.path.abspath(proto)], check=True)
        return load_set(out)


def index(files):
    """Full name -> (kind, descriptor) for every message, enum, service."""
    names = {}

    def add_messages(prefix, messages):
        for m in messages:
            name = f"{prefix}.{m.name}"
            names[name] = ("message", m)
            add_messages(name, m.nested_type)
            for e in m.enum_type:
                names[f"{name}.{e.name}"] = ("enum", e)

    for f in files.file:
        prefix = "." + f.package if f.package else ""
        add_messages(prefix, f.message_type)
        for e in f.enum_type:
            names[f"{prefix}.{e.name}"] = ("enum", e)
        for s in f.service:
            names[f"{prefix}.{s.name}"] = ("service", s)
    return names


def field_type(field):
    if field.type_name:
        return f"{TYPE_NAMES[field.type]} {field.type_name.lstrip('.')}"
    return TYPE_NAMES[field.type]


def oneof_of(message, field):
    if not field.HasField("oneof_index"):
        return None
    oneof = message.oneof_decl[field.oneof_index].name
    # proto3 `optional` is a synthetic oneof named after its field.
    return None if field.proto3_optional else oneof


def check_message(name, old, new, problems):
    short = name.lstrip(".")
    new_by_name = {f.name: f for f in new.field}
    new_by_number = {f.number: f for f in new.field}
    for f in old.field:
        what = f"{short}.{f.name} (field {f.number})"
        g = new_by_name.get(f.name)
        if g is None:
            other = new_by_number.get(f.number)
            problems.append(f"{what}: removed" + (
                f"; its number is now {short}.{other.name}" if other else ""))
            continue
        if g.number != f.number:
            problems.append(f"{what}: renumbered to {g.number}")
            continue
        if field_type(g) != field_type(f):
            problems.append(f"{what}: type {field_type(f)} is now "
                            f"{field_type(g)}")
        if g.label != f.label:
            problems.append(f"{what}: {LABEL_NAMES[f.label]} is now "
                            f"{LABEL_NAMES[g.label]}")
        if oneof_of(old, f) != oneof_of(new, g):
            problems.append(f"{what}: oneof {oneof_of(old, f)} is now "
                            f"{oneof_of(new, g)}")


def check_enum(name, old, new, problems):
    short = name.lstrip(".")
    values = {v.name: v.number for v in new.value}
    for v in old.value:
        if v.name not in values:
            problems.append(f"{short}.{v.name} (= {v.number}): removed")
        elif values[v.name] != v.number:
            problems.append(f"{short}.{v.name} (= {v.number}): renumbered "
                            f"to {values[v.name]}")


def check_service(name, old, new, problems):
    short = name.lstrip(".")
    methods = {m.name: m for m in new.method}
    for m in old.method:
        what = f"{short}.{m.name}"
        n = methods.get(m.name)
        if n is None:
            problems.append(f"{what}: method removed")
            continue
        for part in ("input_type", "output_type"):
            if getattr(n, part) != getattr(m, part):
                problems.append(f"{what}: {part} {getattr(m, part)} is now "
                                f"{getattr(n, part)}")
        for part in ("client_streaming", "server_streaming"):
            if getattr(n, part) != getattr(m, part):
                problems.append(f"{what}: {part} changed")


def compare(old_files, new_files):
    """Lines naming each break of old_files' API in new_files."""
    old, new = index(old_files), index(new_files)
    problems = []
    for name, (kind, descriptor) in sorted(old.items()):
        got = new.get(name)
        if got is None or got[0] != kind:
            problems.append(f"{name.lstrip('.')}: {kind} removed")
            continue
        check = {"message": check_message, "enum": check_enum,
                 "service": check_service}[kind]
        check(name, descriptor, got[1], problems)
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", action="append",
                        help="FileDescriptorSet of a release (repeatable)")
    parser.add_argument("--new", default=os.path.join(
        REPO, "proto", "normserve", "v1", "normserve.proto"))
    parser.add_argument("--protoc", default="protoc")
    args = parser.parse_args()
    olds = args.old or sorted(glob.glob(os.path.join(REPO, "proto", "compat",
                                                     "*.pb")))
    if not olds:
        print("check-proto-compat: no released descriptor sets found",
              file=sys.stderr)
        return 2
    new = compile_proto(args.new, args.protoc)
    failed = False
    for path in olds:
        problems = compare(load_set(path), new)
        label = os.path.relpath(path, REPO)
        if problems:
            failed = True
            print(f"{args.new} breaks clients of {label}:")
            for line in problems:
                print(f"  {line}")
        else:
            print(f"{label}: compatible")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
