"""Embedded instruction sets, built from what Python ships: no download.

``instruct:stdlib-functions``: every function and method of the interpreter's standard
library that has a docstring and a body after it. The prompt is the function's ``def`` line(s)
and docstring, the completion its body (both dedented to the ``def``'s level); records are
grouped by source file, so a file's functions are all on one side of the train/validation
split (held out by source file). ``max_documents`` keeps the first source files.

``resolve_instruct_source`` turns a data argument into records: one of these sets
(``instruct:NAME``) or local instruction files (``es_llm.data.instruct``).
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

from es_llm.data.documents import keep_first, stat_entry, stdlib_files, stdlib_root
from es_llm.data.instruct import (
    INSTRUCT_PREFIX,
    InstructDataError,
    InstructSource,
    Record,
    local_instruct_source,
)

EXTRACTOR_VERSION = 1
MAX_FUNCTION_LINES = 200  # longer functions are skipped (they could never fit a sample)


def _functions(tree: ast.AST) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method, in source order."""
    out: list = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((prefix + child.name, child))
                walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")

    walk(tree, "")
    return out


def function_records(rel: str, source: str) -> list[Record]:
    """The prompt-completion records of one source file (none when it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for name, fn in _functions(tree):
        body = fn.body
        if (
            len(body) < 2
            or not isinstance(body[0], ast.Expr)
            or not isinstance(body[0].value, ast.Constant)
            or not isinstance(body[0].value.value, str)
            or fn.end_lineno is None
            or body[0].end_lineno is None
            or fn.end_lineno - fn.lineno > MAX_FUNCTION_LINES
        ):
            continue
        doc_end = body[0].end_lineno
        if body[1].lineno <= doc_end:  # "docstring; statement" on one line
            continue
        text = textwrap.dedent("".join(lines[fn.lineno - 1 : fn.end_lineno]))
        split = doc_end - fn.lineno + 1
        parts = text.splitlines(keepends=True)
        prompt, completion = "".join(parts[:split]), "".join(parts[split:])
        if completion.strip():
            out.append(
                Record(
                    f"{rel}::{name}:{fn.lineno}",
                    "prompt-completion",
                    prompt=prompt,
                    completion=completion,
                    group=rel,
                )
            )
    return out


def stdlib_functions_source(max_documents: int | None = None) -> InstructSource:
    files = stdlib_files(max_documents)
    if not files:
        raise InstructDataError(f"no .py files found in the standard library at {stdlib_root()}")
    fingerprint = {
        "kind": "instruct-stdlib-functions",
        "extractor": EXTRACTOR_VERSION,
        "python": sys.version,
        "files": [stat_entry(p, rel) for rel, p in files],
    }

    def load() -> list[Record]:
        out: list[Record] = []
        for rel, p in files:
            out.extend(function_records(rel, Path(p).read_bytes().decode("utf-8", "replace")))
        return out

    return InstructSource("stdlib-functions", fingerprint, load)


EMBEDDED = {"stdlib-functions": stdlib_functions_source}


def embedded_instruct_source(name: str, max_documents: int | None = None) -> InstructSource:
    make = EMBEDDED.get(name.strip().lower())
    if make is None:
        raise InstructDataError(
            f"unknown embedded instruction set 'instruct:{name}'; known: "
            + ", ".join(f"instruct:{k}" for k in EMBEDDED)
        )
    return make(max_documents)


def resolve_instruct_source(data: str, max_documents: int | None = None) -> InstructSource:
    """``instruct:<embedded set>`` or local instruction files (``max_documents``: see
    ``load_corpus``; for a local source the first records, for an embedded set its own knob)."""
    if data.strip().lower().startswith(INSTRUCT_PREFIX):
        return embedded_instruct_source(data.strip()[len(INSTRUCT_PREFIX) :], max_documents)
    return keep_first(local_instruct_source(data), max_documents)
