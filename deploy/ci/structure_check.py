#!/usr/bin/env python3
"""Structure checks for the workspace: sizes and module import cycles.

Why: issue 15 asks that no file outside tests exceed 700 lines, no function
outside tests exceed 80 lines and no two modules of a crate import each other
(directly or through a ring). This script measures all three so CI and
reviewers see what remains.

  structure_check.py sizes  [--max-file 700] [--max-fn 80] [crate ...]
  structure_check.py cycles [crate ...]

Function length is counted roughly: from the line holding `fn name` to the
line closing its body's outermost brace. `#[cfg(test)] mod tests { ... }`
blocks, `tests/`, `benches/` and `examples/` are skipped. Exit status is 1
when anything is over a limit or a cycle exists.
"""
import argparse
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CRATES = os.path.join(ROOT, "crates")


def crate_dirs(names):
    names = names or sorted(os.listdir(CRATES))
    return [(n, os.path.join(CRATES, n, "src")) for n in names
            if os.path.isdir(os.path.join(CRATES, n, "src"))]


def rust_files(src):
    for d, _, files in os.walk(src):
        for f in sorted(files):
            if f.endswith(".rs"):
                yield os.path.join(d, f)


def strip_strings_comments(text):
    """Blank out comments and string/char literals, keeping line structure."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
            continue
        if text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
            continue
        m = re.match(r'b?r(#*)"', text[i:i + 300])
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j
            continue
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
            continue
        if c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:i + 12])
            if m:
                out.append("' '")
                i += m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def without_test_modules(code):
    """Remove `#[cfg(test)] mod x { ... }` blocks (line structure kept)."""
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(#\[[^\]]*\]\s*)*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", code):
        if m.start() < pos:
            continue
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        out.append(code[pos:m.start()])
        out.append("\n" * code.count("\n", m.start(), j))
        pos = j
    out.append(code[pos:])
    return "".join(out)


FN_RE = re.compile(r"\bfn\s+(\w+)")


def long_functions(code, limit):
    lines = code.split("\n")
    found = []
    for m in FN_RE.finditer(code):
        # Find the body's opening brace (a `;` first means a declaration).
        j = m.end()
        depth_paren = 0
        while j < len(code):
            ch = code[j]
            if ch in "(<[":
                depth_paren += 1
            elif ch in ")>]":
                depth_paren -= 1
            elif ch == ";" and depth_paren <= 0:
                j = -1
                break
            elif ch == "{" and depth_paren <= 0:
                break
            j += 1
        if j < 0 or j >= len(code):
            continue
        depth, k = 1, j + 1
        while k < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[k], 0)
            k += 1
        first = code.count("\n", 0, m.start()) + 1
        last = code.count("\n", 0, k) + 1
        body = [l for l in lines[first - 1:last] if l.strip()]
        if len(body) > limit:
            found.append((m.group(1), first, len(body)))
    return found


def sizes(args):
    bad = 0
    for name, src in crate_dirs(args.crates):
        for path in rust_files(src):
            rel = os.path.relpath(path, ROOT)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            code = without_test_modules(strip_strings_comments(text))
            n = len([l for l in code.split("\n") if l.strip()]) if args.code_only else text.count("\n")
            if n > args.max_file:
                print(f"file  {rel}: {n} lines (max {args.max_file})")
                bad += 1
            for fn, line, count in long_functions(code, args.max_fn):
                print(f"fn    {rel}:{line} {fn}: {count} lines (max {args.max_fn})")
                bad += 1
    print(f"{bad} over the limits")
    return 1 if bad else 0


def module_path(src, path):
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ("lib", "main", "mod"):
        rel = rel[:-1]
    return tuple(p for p in rel if p)


USE_RE = re.compile(r"\buse\s+((?:crate|super|self)\b[^;]*);", re.S)
PATH_RE = re.compile(r"\b(crate|super)((?:\s*::\s*\w+)+)")


def expand_use(tree):
    """Expand a use tree (`crate::a::{b, c::d}`) into paths."""
    tree = re.sub(r"\s+", "", tree)

    def walk(prefix, s):
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        for p in parts:
            if not p:
                continue
            if "{" in p:
                head, rest = p.split("{", 1)
                yield from walk(prefix + [x for x in head.split("::") if x], rest[:-1])
            else:
                yield prefix + [x for x in p.split(" as ")[0].split("::") if x]

    return list(walk([], tree))


def resolve(me, segs, modules):
    cur = list(me)
    i = 0
    if segs and segs[0] == "crate":
        cur, i = [], 1
    while i < len(segs) and segs[i] in ("super", "self"):
        if segs[i] == "super":
            cur = cur[:-1]
        i += 1
    best = tuple(cur)
    for s in segs[i:]:
        cand = best + (s,)
        if cand in modules:
            best = cand
        else:
            break
    return best


def cycles(args):
    found = 0
    for name, src in crate_dirs(args.crates):
        files = {module_path(src, p): p for p in rust_files(src)}
        modules = set(files)
        edges = {}
        for me, path in files.items():
            with open(path, encoding="utf-8") as f:
                code = without_test_modules(strip_strings_comments(f.read()))
            refs = []
            for m in USE_RE.finditer(code):
                refs += expand_use(m.group(1))
            code2 = USE_RE.sub("", code)
            for m in PATH_RE.finditer(code2):
                refs.append([m.group(1)] + [x for x in re.split(r"\s*::\s*", m.group(2)) if x])
            for segs in refs:
                target = resolve(me, segs, modules)
                # Collapse to the two siblings under the common ancestor.
                k = 0
                while k < min(len(me), len(target)) and me[k] == target[k]:
                    k += 1
                if k == len(me) or k == len(target):
                    continue  # ancestor/descendant: not a cycle between siblings
                a, b = me[:k + 1], target[:k + 1]
                edges.setdefault(a, set()).add(b)
        for comp in sccs(edges):
            if len(comp) > 1:
                found += 1
                names = ", ".join("::".join(c) for c in sorted(comp))
                print(f"cycle {name}: {names}")
    print(f"{found} import cycles")
    return 1 if found else 0


def sccs(edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    nodes = set(edges) | {b for bs in edges.values() for b in bs}

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
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
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return out


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sizes")
    s.add_argument("--max-file", type=int, default=700)
    s.add_argument("--max-fn", type=int, default=80)
    s.add_argument("--code-only", action="store_true",
                   help="count non-blank code lines of a file instead of all lines")
    s.add_argument("crates", nargs="*")
    c = sub.add_parser("cycles")
    c.add_argument("crates", nargs="*")
    args = p.parse_args()
    sys.exit(sizes(args) if args.cmd == "sizes" else cycles(args))


if __name__ == "__main__":
    main()
