#!/usr/bin/env python3
"""Generates docs/api.md, the API reference, from the comments of
proto/handid/v1/handid.proto (python3 standard library only).

Every service, rpc, message, field, oneof, enum and enum value is listed
with the comment written above it in the proto, in the proto's order. The
proto is the contract; this page is a rendering of it, so edit the proto
and rerun:

    python3 scripts/gen_api_docs.py            # rewrite docs/api.md
    python3 scripts/gen_api_docs.py --check    # exit 1 when docs/api.md is stale
    python3 scripts/gen_api_docs.py --out -    # print to stdout

The parser knows the subset of proto3 the file uses: line comments,
`service`/`rpc`, `message` (nested messages and enums too), `oneof`,
`enum`, `repeated`/`optional`/`map<>` fields. Anything else inside a block
is an error, so a construct it does not render cannot go unnoticed.
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROTO = ROOT / "proto" / "handid" / "v1" / "handid.proto"
DEFAULT_OUT = ROOT / "docs" / "api.md"

RPC = re.compile(r"rpc\s+(\w+)\s*\(\s*(stream\s+)?([\w.]+)\s*\)\s*returns\s*\(\s*(stream\s+)?([\w.]+)\s*\)\s*;")
FIELD = re.compile(r"(repeated\s+|optional\s+)?(map\s*<\s*[\w.]+\s*,\s*[\w.]+\s*>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;")
ENUM_VALUE = re.compile(r"(\w+)\s*=\s*(-?\d+)\s*;")
OPEN = re.compile(r"(service|message|enum|oneof)\s+(\w+)\s*\{")


class ProtoError(Exception):
    pass


def lines_of(text):
    """(line number, code, comment, is_blank) per line; `//` comments only."""
    for number, line in enumerate(text.splitlines(), 1):
        code, _, comment = line.partition("//")
        comment = comment[1:] if comment.startswith(" ") else comment
        yield number, code.strip(), comment, not line.strip()


def parse(text):
    """The proto as a tree of dicts: {kind, name, doc, children, ...}; the
    comment block before `syntax` is the file's `header`."""
    root = {"kind": "file", "name": "", "doc": [], "children": [], "header": [], "package": ""}
    stack = [root]
    pending = []  # comment lines waiting for the next declaration
    seen_code = False
    for number, code, comment, blank in lines_of(text):
        if blank:
            pending = []  # a detached comment documents nothing
            continue
        if not code:
            pending.append(comment.rstrip())
            continue
        if not seen_code:
            root["header"], pending = pending, []
            seen_code = True
        parent = stack[-1]
        doc, pending = pending, []
        if code == "}":
            if len(stack) == 1:
                raise ProtoError(f"line {number}: unbalanced '}}'")
            stack.pop()
            continue
        opened = OPEN.match(code)
        if opened:
            kind, name = opened.groups()
            allowed = {
                "file": {"service", "message", "enum"},
                "message": {"message", "enum", "oneof"},
            }.get(parent["kind"], set())
            if kind not in allowed:
                raise ProtoError(f"line {number}: {kind} inside {parent['kind']} is not supported")
            node = {"kind": kind, "name": name, "doc": doc, "children": []}
            parent["children"].append(node)
            if not code.endswith("}"):
                stack.append(node)
            continue
        if parent["kind"] == "file":
            if code.startswith(("syntax", "import", "option")):
                continue
            if code.startswith("package"):
                root["package"] = code.removeprefix("package").strip(" ;")
                continue
        elif parent["kind"] == "service":
            m = RPC.match(code)
            if m:
                name, cs, req, ss, resp = m.groups()
                parent["children"].append(
                    {
                        "kind": "rpc",
                        "name": name,
                        "doc": doc,
                        "request": ("stream " if cs else "") + req,
                        "response": ("stream " if ss else "") + resp,
                    }
                )
                continue
        elif parent["kind"] in ("message", "oneof"):
            m = FIELD.match(code)
            if m:
                label, ftype, name, num = m.groups()
                parent["children"].append(
                    {
                        "kind": "field",
                        "name": name,
                        "doc": doc,
                        "type": ftype.replace(" ", ""),
                        "label": (label or "").strip(),
                        "number": int(num),
                    }
                )
                continue
            if code.startswith("reserved"):
                continue
        elif parent["kind"] == "enum":
            m = ENUM_VALUE.match(code)
            if m:
                name, num = m.groups()
                parent["children"].append({"kind": "value", "name": name, "doc": doc, "number": int(num)})
                continue
        raise ProtoError(f"line {number}: cannot read {code!r} inside {parent['kind']} {parent['name']}")
    if len(stack) != 1:
        raise ProtoError(f"{stack[-1]['kind']} {stack[-1]['name']} is not closed")
    return root


def one_line(doc):
    """A comment as one table cell."""
    text = " ".join(line.strip() for line in doc if line.strip())
    return text.replace("|", "\\|") if text else "-"


def paragraph(doc):
    """A comment as Markdown: `*` bullets become `-`, blank comment lines
    separate paragraphs."""
    out = []
    for line in doc:
        stripped = line.strip()
        if stripped.startswith("* "):
            out.append("- " + stripped[2:])
        elif line.startswith("    ") and out and out[-1].startswith(("- ", "  ")):
            out.append("  " + stripped)
        else:
            out.append(stripped)
    return "\n".join(out).strip()


def anchor(name):
    return name.lower()


def type_cell(ftype, known):
    base = ftype.split(".")[-1]
    if base in known:
        return f"[`{ftype}`](#{anchor(base)})"
    return f"`{ftype}`"


def render(tree, proto_name):
    services = [n for n in tree["children"] if n["kind"] == "service"]
    messages, enums = [], []

    def collect(node, prefix):
        for child in node["children"]:
            if child["kind"] == "message":
                messages.append((prefix + child["name"], child))
                collect(child, prefix + child["name"] + ".")
            elif child["kind"] == "enum":
                enums.append((prefix + child["name"], child))

    collect(tree, "")
    known = {full.split(".")[-1] for full, _ in messages + enums}

    out = [
        f"# `{tree['package']}` API reference",
        "",
        f"Generated from `{proto_name}` by `scripts/gen_api_docs.py`; do not edit by",
        "hand. Edit the proto's comments and rerun the script: the test",
        "`tests/tests/api_docs.rs` fails while this page and the proto disagree.",
        "",
    ]
    if tree["header"]:
        out += [paragraph(tree["header"]), ""]

    out += ["## Services", ""]
    for service in services:
        out += [f"### {service['name']}", ""]
        if service["doc"]:
            out += [paragraph(service["doc"]), ""]
        out += ["| rpc | request | response |", "|---|---|---|"]
        for rpc in service["children"]:
            out.append(
                f"| [`{rpc['name']}`](#{anchor(service['name'] + '-' + rpc['name'])}) "
                f"| {type_cell(rpc['request'].removeprefix('stream '), known)} "
                f"| {type_cell(rpc['response'].removeprefix('stream '), known)} |"
            )
        out.append("")
        for rpc in service["children"]:
            out += [
                f"#### {service['name']}-{rpc['name']}",
                "",
                f"`rpc {rpc['name']}({rpc['request']}) returns ({rpc['response']})`",
                "",
            ]
            if rpc["doc"]:
                out += [paragraph(rpc["doc"]), ""]

    out += ["## Messages", ""]
    for full, message in messages:
        out += [f"### {full}", ""]
        if message["doc"]:
            out += [paragraph(message["doc"]), ""]
        rows = []
        for child in message["children"]:
            if child["kind"] == "field":
                rows.append((child, ""))
            elif child["kind"] == "oneof":
                for field in child["children"]:
                    rows.append((field, child["name"]))
        if not rows:
            out += ["No fields.", ""]
            continue
        out += ["| field | type | number | description |", "|---|---|---|---|"]
        for field, oneof in rows:
            label = f"{field['label']} " if field["label"] else ""
            description = (f"One of `{oneof}`. " if oneof else "") + (
                one_line(field["doc"]) if field["doc"] or not oneof else ""
            )
            out.append(
                f"| `{field['name']}` | {label}{type_cell(field['type'], known)} | {field['number']} "
                f"| {description.strip()} |"
            )
        oneofs = [c for c in message["children"] if c["kind"] == "oneof"]
        for oneof in oneofs:
            members = ", ".join(f"`{f['name']}`" for f in oneof["children"])
            note = one_line(oneof["doc"]) + " " if oneof["doc"] else ""
            out += ["", f"`oneof {oneof['name']}`: {note}at most one of {members} is set."]
        out.append("")

    out += ["## Enums", ""]
    for full, enum in enums:
        out += [f"### {full}", ""]
        if enum["doc"]:
            out += [paragraph(enum["doc"]), ""]
        out += ["| value | number | description |", "|---|---|---|"]
        for value in enum["children"]:
            out.append(f"| `{value['name']}` | {value['number']} | {one_line(value['doc'])} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proto", type=Path, default=DEFAULT_PROTO)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="file to write, or - for stdout")
    parser.add_argument("--check", action="store_true", help="exit 1 when --out differs from the output")
    args = parser.parse_args()
    try:
        tree = parse(args.proto.read_text(encoding="utf-8"))
    except ProtoError as e:
        sys.exit(f"{args.proto}: {e}")
    try:
        name = args.proto.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        name = args.proto.name
    text = render(tree, name)
    if args.out == "-":
        sys.stdout.write(text)
        return
    out = Path(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else ""
        if current != text:
            sys.exit(f"{out} is out of step with {name}: run python3 scripts/gen_api_docs.py")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
