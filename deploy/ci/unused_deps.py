#!/usr/bin/env python3
"""Rough unused-dependency check (like cargo-machete): a dependency of a workspace
crate whose Rust name never appears in that crate's sources is reported.

Why: issue 15 found unused dependencies (`hex`, `toml`) that only cost build time.
Rough by design: a crate used only through a macro re-export or a feature may be
reported; look before removing.

  unused_deps.py [crate ...]
"""
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def sections(toml):
    current, out = None, {}
    for line in toml.splitlines():
        m = re.match(r"\s*\[([^\]]+)\]", line)
        if m:
            current = m.group(1).strip()
            continue
        m = re.match(r"\s*([A-Za-z0-9_-]+)(\.workspace)?\s*=", line)
        if m and current in ("dependencies", "dev-dependencies", "build-dependencies"):
            out.setdefault(current, []).append(m.group(1))
    return out


def sources(crate_dir, kinds):
    text = []
    for sub in kinds:
        base = os.path.join(crate_dir, sub)
        for d, _, files in os.walk(base):
            for f in files:
                if f.endswith(".rs"):
                    text.append(open(os.path.join(d, f), encoding="utf-8").read())
    return "\n".join(text)


def main():
    names = sys.argv[1:] or sorted(os.listdir(os.path.join(ROOT, "crates")))
    found = 0
    for name in names:
        crate_dir = os.path.join(ROOT, "crates", name)
        toml_path = os.path.join(crate_dir, "Cargo.toml")
        if not os.path.exists(toml_path):
            continue
        toml = open(toml_path, encoding="utf-8").read()
        # Test targets outside the crate folder (the binary's e2e tests).
        extra = [os.path.normpath(os.path.join(crate_dir, p)) for p in re.findall(r'path\s*=\s*"([^"]+\.rs)"', toml)]
        src = sources(crate_dir, ["src", "build.rs"]) + "\n" + (open(os.path.join(crate_dir, "build.rs")).read() if os.path.exists(os.path.join(crate_dir, "build.rs")) else "")
        tests = sources(crate_dir, ["tests", "benches", "examples"]) + src
        for p in extra:
            if os.path.exists(p):
                tests += open(p, encoding="utf-8").read()
        if any(os.path.exists(p) for p in extra):
            tests += sources(os.path.join(ROOT, "tests"), ["support"])
        for section, deps in sections(toml).items():
            text = tests if section == "dev-dependencies" else src
            for dep in deps:
                ident = dep.replace("-", "_")
                if not re.search(r"\b" + re.escape(ident) + r"\b", text):
                    print(f"{name}: [{section}] {dep} looks unused")
                    found += 1
    print(f"{found} dependencies look unused")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
