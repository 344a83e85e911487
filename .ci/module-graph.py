#!/usr/bin/env python3
"""Checks that data flows one way between the top-level modules of a crate.

Usage: module-graph.py SRC_DIR [--layers FILE]

Reads every .rs file under SRC_DIR, maps it to its top-level module (the first path component
below SRC_DIR; lib.rs and main.rs are the crate root), and collects the modules each one names
through `crate::NAME` (in `use` trees too: `use crate::{a, b::c}`), or `super::NAME` in a
top-level module's own file, outside comments. Prints the
graph, then fails (exit 1) when
  - the modules form a cycle (a strongly connected component of more than one module), or
  - a module other than the crate root and `net` refers to `session` (the session sits at the
    top of the library: everything below it serves it and must not call back), or
  - with --layers FILE (one layer per line, top first, modules separated by spaces; `#`
    comments): a module uses one in a layer above its own, or a module is in no layer.
    Modules of one layer may use each other (the cycle check still applies).
The crate root may use anything; nothing may use the crate root (`crate::some_fn` defined in
lib.rs counts as the root).
"""
import os
import re
import sys

ROOT = "(root)"


def module_of(src, path):
    rel = os.path.relpath(path, src)
    first = rel.split(os.sep)[0]
    if first in ("lib.rs", "main.rs"):
        return ROOT
    return first[:-3] if first.endswith(".rs") else first


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def use_tree_heads(tree):
    """Top-level names of a use tree like `{a, b::c, d::{e, f}}` or `a::b`."""
    tree = tree.strip()
    if not tree.startswith("{"):
        return [re.split(r"::|\s|;|,|\}", tree, maxsplit=1)[0]]
    heads, depth, current = [], 0, ""
    for ch in tree[1:]:
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            heads.append(current)
            current = ""
        else:
            current += ch
    heads.append(current)
    return [re.split(r"::|\s", h.strip(), maxsplit=1)[0] for h in heads if h.strip()]


def main():
    args = sys.argv[1:]
    layers_file = None
    if "--layers" in args:
        i = args.index("--layers")
        layers_file = args[i + 1]
        del args[i : i + 2]
    src = args[0] if args else "proxy/src"
    modules = set()
    edges = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith(".rs"):
                modules.add(module_of(src, os.path.join(dirpath, f)))
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            here = module_of(src, path)
            with open(path, encoding="utf-8") as fh:
                text = strip_comments(fh.read())
            names = set()
            # In a top-level module's own file, `super::` is the crate root.
            rel = os.path.relpath(path, src).split(os.sep)
            own_file = len(rel) == 1 or (len(rel) == 2 and rel[1] == "mod.rs")
            pattern = r"\b(?:crate|super)::" if own_file and here != ROOT else r"\bcrate::"
            for m in re.finditer(pattern + r"(\{|[A-Za-z_][A-Za-z0-9_]*)", text):
                if m.group(1) == "{":
                    names.update(use_tree_heads(text[m.start(1):]))
                else:
                    names.add(m.group(1))
            for n in names:
                target = n if n in modules else ROOT
                if target != here:
                    edges.setdefault(here, set()).add((target, os.path.relpath(path, src)))
    graph = {m: sorted({t for t, _ in edges.get(m, ())}) for m in sorted(modules)}
    for m, ts in graph.items():
        print(f"{m} -> {', '.join(ts) if ts else '-'}")

    problems = []
    for m, ts in edges.items():
        for t, where in sorted(ts):
            if t == ROOT and m != ROOT:
                problems.append(f"{where} ({m}) uses the crate root")
            if t == "session" and m not in (ROOT, "net"):
                problems.append(f"{where} ({m}) uses session, which sits above it")

    if layers_file:
        layer = {}
        with open(layers_file, encoding="utf-8") as fh:
            for n, line in enumerate(l.split("#", 1)[0].split() for l in fh):
                for m in line:
                    layer[m] = n
        for m in sorted(modules - {ROOT}):
            if m not in layer:
                problems.append(f"{m} is in no layer of {layers_file}")
        for m, ts in edges.items():
            for t, where in sorted(ts):
                if m in layer and t in layer and layer[t] < layer[m]:
                    problems.append(f"{where} ({m}) uses {t}, in a layer above it")

    # Tarjan's strongly connected components.
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    for comp in comps:
        if len(comp) > 1:
            problems.append("import cycle: " + " <-> ".join(sorted(comp)))

    if problems:
        print("\nmodule graph problems:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("\nno cycles between top-level modules; nothing below session uses it"
          + ("; every use goes down the layers" if layers_file else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
