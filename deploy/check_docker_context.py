#!/usr/bin/env python3
"""Checks, without a Docker daemon, that deploy/Dockerfile's build stage gets everything
`cargo build --release --locked` reads: each such path must be in the build context (not
excluded by .dockerignore) and copied by a COPY of the build stage to where cargo looks for it.

    python3 deploy/check_docker_context.py [--dockerfile PATH] [--dockerignore PATH] [-v]

What cargo needs, read from Cargo.toml (and, recursively, from path dependencies and workspace
members): Cargo.toml, Cargo.lock, src/, the file of every declared [lib]/[[bin]]/[[bench]]/
[[example]]/[[test]] target (its `path`, else the default location: a declared target whose file
is missing fails every cargo command, build included), the build script (`build = …`, else
build.rs when present), files the compiled sources name in include_str!/include_bytes!/include!
or #[path], and .cargo/config.toml and rust-toolchain(.toml) when present. Auto-discovered
targets (examples/, tests/) are needed only if declared. `readme`, `license-file` and `include`
are read by `cargo package` only, so they are not required here.

Prints one line per problem and exits 1, or one OK line and exits 0. Standard library only
(Python 3.11+ for tomllib).
"""
import argparse
import json
import os
import posixpath
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    sys.exit("check_docker_context.py needs Python 3.11+ (tomllib)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- .dockerignore, as moby/patternmatcher reads and matches it ------------------------------

def read_dockerignore(path):
    """Patterns in order as (regex, exclusion, text). Comments and blank lines skipped; a
    leading `!` re-includes; patterns are cleaned and relative to the context root."""
    patterns = []
    if not os.path.exists(path):
        return patterns
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
                if not line:
                    continue
            text = posixpath.normpath(line)
            if len(text) > 1 and text.startswith("/"):
                text = text.lstrip("/")
            patterns.append((re.compile(glob_regex(text, double_star=True)), exclusion, ("!" if exclusion else "") + text))
    return patterns


def glob_regex(pattern, double_star):
    """Go filepath.Match syntax as a regex (`*` and `?` never cross `/`), plus Docker's `**`."""
    out, i, n = "^", 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if double_star and i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                out += ".*" if i >= n else "(.*/)?"
                continue
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "\\":
            i += 1
            out += re.escape(pattern[i]) if i < n else "\\\\"
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out += "\\["
            else:
                body = pattern[i + 1:j]
                out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
                i = j
        else:
            out += re.escape(c)
        i += 1
    return out + "$"


def ignored_by(patterns, rel):
    """The pattern that leaves `rel` out of the context, or None. The last matching pattern
    wins; a pattern that matches a parent directory matches everything under it."""
    parts = rel.split("/")
    parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
    verdict = None
    for regex, exclusion, text in patterns:
        if (verdict is None) == exclusion:
            continue  # a re-include only matters once excluded, an exclude only before
        if regex.match(rel) or any(regex.match(p) for p in parents):
            verdict = None if exclusion else text
    return verdict


# --- Dockerfile ------------------------------------------------------------------------------

def instructions(text):
    """(keyword, arguments) per instruction: continuations joined, comments dropped, heredoc
    bodies skipped."""
    escape = "\\"
    lines = text.splitlines()
    m = re.match(r"#\s*escape\s*=\s*(\S)", lines[0]) if lines else None
    if m:
        escape = m.group(1)
    out, buf, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        i += 1
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and (not stripped or stripped.startswith("#")):
            continue  # blank and comment lines inside a continuation are removed
        if line.rstrip().endswith(escape):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        keyword, args = (buf.split(None, 1) + [""])[:2]
        buf = ""
        for marker in re.findall(r"<<-?[\"']?([A-Za-z_][A-Za-z0-9_]*)[\"']?", args):
            while i < len(lines) and lines[i].strip() != marker:
                i += 1
            i += 1
        out.append((keyword.upper(), args.strip()))
    return out


def expand(value, env):
    """$VAR, ${VAR} and ${VAR:-default} from the ARG/ENV values known at that point."""
    def sub(m):
        braced, default, bare = m.groups()
        got = env.get(braced or bare)
        return got if got else (default or "")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, value)


class Stage:
    def __init__(self, name, base=None):
        self.name = name
        self.workdir = base.workdir if base else "/"
        self.files = dict(base.files) if base else {}  # image path -> context path
        self.dirs = set(base.dirs) if base else {"/"}
        self.env = dict(base.env) if base else {}
        self.runs = list(base.runs) if base else []  # (workdir, command, env snapshot)


def stages_of(text, context):
    stages, args = [], {}
    for keyword, rest in instructions(text):
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
            continue
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = expand(words[0], args) if words else ""
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            base = next((s for s in stages if s.name == image), None)
            stages.append(Stage(name, base))
            continue
        if not stages:
            continue
        stage = stages[-1]
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            name = name.strip()
            stage.env.setdefault(name, default.strip().strip('"') or args.get(name, ""))
        elif keyword == "ENV":
            for k, v in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)', rest) or []:
                stage.env[k] = expand(v.strip('"'), stage.env)
            if "=" not in rest.split(" ")[0]:
                k, _, v = rest.partition(" ")
                stage.env[k] = expand(v.strip(), stage.env)
        elif keyword == "WORKDIR":
            stage.workdir = posixpath.normpath(posixpath.join(stage.workdir, expand(rest, stage.env)))
            add_dir(stage, stage.workdir)
        elif keyword == "RUN":
            stage.runs.append((stage.workdir, rest, dict(stage.env)))
        elif keyword in ("COPY", "ADD"):
            copy(stage, keyword, rest, context)
    return stages


def add_dir(stage, path):
    while path not in stage.dirs:
        stage.dirs.add(path)
        path = posixpath.dirname(path)


def copy(stage, keyword, rest, context):
    if rest.startswith("["):
        try:
            words = json.loads(rest)
        except ValueError:
            words = rest.split()
    else:
        words = rest.split()
    flags = [w for w in words if w.startswith("--")]
    words = [expand(w, stage.env) for w in words if not w.startswith("--")]
    if any(f.startswith("--from=") for f in flags) or len(words) < 2:
        return  # from another stage or image, not from the context
    excludes = [re.compile(glob_regex(f.split("=", 1)[1], True)) for f in flags if f.startswith("--exclude=")]
    parents = "--parents" in flags
    *sources, dest = words
    dest_abs = posixpath.normpath(posixpath.join(stage.workdir, dest))
    dest_is_dir = (len(sources) > 1 or dest.endswith("/") or dest in (".", "..") or dest.endswith("/.")
                   or dest_abs in stage.dirs)
    for source in sources:
        if source.startswith("<<") or (keyword == "ADD" and re.match(r"[a-z]+://|git@", source)):
            continue
        for rel in glob_context(context, source):
            full = os.path.join(context.root, rel) if rel else context.root
            if os.path.isdir(full):
                for file_rel in context.files_under(rel):
                    inner = file_rel[len(rel) + 1:] if rel else file_rel
                    if any(x.match(inner) or x.match(file_rel) for x in excludes):
                        continue
                    target = posixpath.join(dest_abs, file_rel if parents else inner)
                    stage.files[target] = file_rel
                    add_dir(stage, posixpath.dirname(target))
            elif context.ignored(rel) is None and not any(x.match(rel) for x in excludes):
                if parents:
                    target = posixpath.join(dest_abs, rel)
                elif dest_is_dir:
                    target = posixpath.join(dest_abs, posixpath.basename(rel))
                else:
                    target = dest_abs
                stage.files[target] = rel
                add_dir(stage, posixpath.dirname(target))


class Context:
    def __init__(self, root, patterns):
        self.root = root
        self.patterns = patterns

    def ignored(self, rel):
        return ignored_by(self.patterns, rel) if rel else None

    def may_reinclude_under(self, directory):
        """Whether some `!` pattern could match a path below an excluded directory."""
        parts = directory.split("/")
        for _, exclusion, text in self.patterns:
            if not exclusion:
                continue
            segments = text[1:].split("/")
            for i, segment in enumerate(segments):
                if "**" in segment:
                    return True
                if i == len(parts):
                    return True  # the pattern goes deeper than the directory and agrees so far
                if not re.match(glob_regex(segment, double_star=False), parts[i]):
                    break
        return False

    def files_under(self, rel):
        """Files under a context directory that are in the context (not ignored)."""
        top = os.path.join(self.root, rel)
        for dirpath, dirnames, filenames in os.walk(top):
            base = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            base = "" if base == "." else base
            # Skip excluded directories no `!` pattern reaches into (target/ holds gigabytes).
            dirnames[:] = [d for d in dirnames if self.ignored(posixpath.join(base, d)) is None
                           or self.may_reinclude_under(posixpath.join(base, d))]
            for name in filenames:
                file_rel = posixpath.join(base, name)
                if self.ignored(file_rel) is None:
                    yield file_rel


def glob_context(context, source):
    """Context paths a COPY source names (Go filepath.Match wildcards, per path segment)."""
    source = posixpath.normpath("/" + source).lstrip("/")
    if not source or source == ".":
        return [""]
    found = [""]
    for segment in source.split("/"):
        regex = re.compile(glob_regex(segment, double_star=False))
        nxt = []
        for base in found:
            full = os.path.join(context.root, base)
            if not os.path.isdir(full):
                continue
            if not re.search(r"[*?\[\\]", segment):
                if os.path.exists(os.path.join(full, segment)):
                    nxt.append(posixpath.join(base, segment))
                continue
            nxt.extend(posixpath.join(base, n) for n in sorted(os.listdir(full)) if regex.match(n))
        found = nxt
    return [f for f in found if context.ignored(f) is None or os.path.isdir(os.path.join(context.root, f))]


# --- what cargo reads ------------------------------------------------------------------------

INCLUDE = re.compile(r'\binclude(?:_str|_bytes)?!\s*\(\s*"([^"]+)"\s*\)'
                     r'|#\[\s*path\s*=\s*"([^"]+)"\s*\]'
                     r'|concat!\s*\(\s*env!\s*\(\s*"CARGO_MANIFEST_DIR"\s*\)\s*,\s*"([^"]+)"\s*\)')


def needed_paths(root):
    """[(path relative to root, is_dir, why)], in order, without duplicates."""
    needed, compiled, seen_crates = {}, [], set()

    def need(rel, is_dir, why, compiles=False):
        rel = posixpath.normpath(rel)
        needed.setdefault((rel, is_dir), why)
        if compiles:
            compiled.append(rel)

    def target_file(crate, name, path, defaults, why, compiles):
        if path:
            need(posixpath.join(crate, path), False, why, compiles)
            return
        for candidate in defaults:
            if os.path.isfile(os.path.join(root, crate, candidate)):
                # A directory target (x/main.rs) may pull in modules beside main.rs.
                is_dir = candidate.endswith("/main.rs")
                need(posixpath.join(crate, posixpath.dirname(candidate) if is_dir else candidate), is_dir, why, compiles)
                return
        need(posixpath.join(crate, defaults[0]), False, f"{why}; not found at {' or '.join(defaults)}")

    def crate(rel, why, lock=False):
        rel = posixpath.normpath(rel)
        if rel in seen_crates:
            return
        seen_crates.add(rel)
        manifest_rel = posixpath.join(rel, "Cargo.toml")
        need(manifest_rel, False, why)
        try:
            with open(os.path.join(root, manifest_rel), "rb") as f:
                manifest = tomllib.load(f)
        except FileNotFoundError:
            return
        if lock:
            need(posixpath.join(rel, "Cargo.lock"), False, "--locked")
        here = posixpath.normpath(manifest_rel)
        package = manifest.get("package")
        if package is not None:
            if os.path.isdir(os.path.join(root, rel, "src")):
                need(posixpath.join(rel, "src"), True, f"{here}: the package's sources", compiles=True)
            lib = manifest.get("lib", {})
            if lib.get("path"):
                need(posixpath.join(rel, lib["path"]), False, f"{here} [lib] path", compiles=True)
            for kind, folder in (("bin", "src/bin"), ("bench", "benches"), ("example", "examples"), ("test", "tests")):
                for t in manifest.get(kind, []):
                    name = t.get("name", "?")
                    defaults = [f"{folder}/{name}.rs", f"{folder}/{name}/main.rs"]
                    if kind == "bin" and name == package.get("name"):
                        defaults.insert(0, "src/main.rs")
                    target_file(rel, name, t.get("path"), defaults, f"{here} [[{kind}]] {name}", compiles=kind == "bin")
            build = package.get("build")
            if isinstance(build, str):
                need(posixpath.join(rel, build), False, f"{here} build = {build!r}", compiles=True)
            elif build is True or (build is None and os.path.isfile(os.path.join(root, rel, "build.rs"))):
                need(posixpath.join(rel, "build.rs"), False, f"{here}: build script", compiles=True)
        tables = [manifest]
        tables += list(manifest.get("target", {}).values())
        for table in tables:
            for section in ("dependencies", "dev-dependencies", "build-dependencies"):
                for dep_name, dep in table.get(section, {}).items():
                    if isinstance(dep, dict) and "path" in dep:
                        crate(posixpath.join(rel, dep["path"]), f"{here} [{section}] {dep_name} path")
        workspace = manifest.get("workspace", {})
        for dep_name, dep in workspace.get("dependencies", {}).items():
            if isinstance(dep, dict) and "path" in dep:
                crate(posixpath.join(rel, dep["path"]), f"{here} [workspace.dependencies] {dep_name} path")
        for member in workspace.get("members", []):
            matches = glob_paths(root, posixpath.join(rel, member))
            for m in matches or [posixpath.join(rel, member)]:
                if m not in [posixpath.join(rel, e) for e in workspace.get("exclude", [])]:
                    crate(m, f"{here} [workspace] members")
        for registry in manifest.get("patch", {}).values():
            for dep_name, dep in registry.items():
                if isinstance(dep, dict) and "path" in dep:
                    crate(posixpath.join(rel, dep["path"]), f"{here} [patch] {dep_name} path")

    crate(".", "the manifest", lock=True)
    for extra in (".cargo/config.toml", ".cargo/config", "rust-toolchain.toml", "rust-toolchain"):
        if os.path.isfile(os.path.join(root, extra)):
            need(extra, False, "changes how cargo builds")

    # Files the compiled sources pull in (benches, examples and tests are not compiled by a build).
    for rel in compiled:
        full = os.path.join(root, rel)
        files = [full] if os.path.isfile(full) else [os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if f.endswith(".rs")]
        for path in files:
            try:
                text = open(path, encoding="utf-8").read()
            except (OSError, UnicodeDecodeError):
                continue
            for literal, attr, manifest_relative in INCLUDE.findall(text):
                if manifest_relative:
                    target = posixpath.join(crate_of(root, path), manifest_relative.lstrip("/"))
                else:
                    target = posixpath.join(posixpath.dirname(os.path.relpath(path, root).replace(os.sep, "/")), literal or attr)
                source = os.path.relpath(path, root).replace(os.sep, "/")
                need(target, os.path.isdir(os.path.join(root, target)), f"{source} includes it")
    return [(rel, is_dir, why) for (rel, is_dir), why in needed.items()]


def crate_of(root, path):
    d = os.path.dirname(path)
    while d.startswith(root) and not os.path.isfile(os.path.join(d, "Cargo.toml")):
        d = os.path.dirname(d)
    return os.path.relpath(d, root).replace(os.sep, "/")


def glob_paths(root, pattern):
    found = [""]
    for segment in pattern.split("/"):
        if segment == ".":
            continue
        regex = re.compile(glob_regex(segment, double_star=False))
        found = [posixpath.join(b, n) for b in found if os.path.isdir(os.path.join(root, b))
                 for n in sorted(os.listdir(os.path.join(root, b))) if regex.match(n)]
    return found


# --- the check -------------------------------------------------------------------------------

def shown(path, root):
    """A path as the user would type it: relative to the context when inside it."""
    rel = os.path.relpath(os.path.abspath(path), root)
    return path if rel.startswith("..") else rel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", default=os.path.join(ROOT, "deploy", "Dockerfile"))
    parser.add_argument("--dockerignore", help="default: <dockerfile>.dockerignore if present (BuildKit's rule), else .dockerignore at the context root")
    parser.add_argument("--context", default=ROOT, help="the build context (default: the repository root)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every needed path and where it is copied")
    opts = parser.parse_args()

    root = os.path.abspath(opts.context)
    ignore_file = opts.dockerignore
    if ignore_file is None:
        beside = opts.dockerfile + ".dockerignore"
        ignore_file = beside if os.path.exists(beside) else os.path.join(root, ".dockerignore")
    context = Context(root, read_dockerignore(ignore_file))
    with open(opts.dockerfile, encoding="utf-8") as f:
        stages = stages_of(f.read(), context)

    problems = []
    build = None
    for stage in stages:
        for run in stage.runs:
            if re.search(r"\bcargo\s+(\+\S+\s+)?build\b", run[1]):
                build = (stage, run)
    if build is None:
        print(f"{shown(opts.dockerfile, root)}: no stage runs `cargo build`")
        sys.exit(1)
    stage, (workdir, command, env) = build
    if "--locked" not in command:
        problems.append(f"{shown(opts.dockerfile, root)}: `cargo build` without --locked")
    if "QODER_EXPORTER_REVISION" not in env:
        problems.append(f"{shown(opts.dockerfile, root)}: QODER_EXPORTER_REVISION is not set (ENV from ARG REVISION) before `cargo build`")

    needed = needed_paths(root)
    for rel, is_dir, why in needed:
        full = os.path.join(root, rel)
        image = posixpath.normpath(posixpath.join(workdir, rel))
        if rel.startswith("../") or rel == "..":
            problems.append(f"{rel}: outside the build context ({why})")
            continue
        if not os.path.exists(full):
            problems.append(f"{rel}: missing from the repository ({why})")
            continue
        files = [rel] if not is_dir else [
            os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, fs in os.walk(full) for f in fs]
        lines = []
        for file_rel in sorted(files):
            pattern = context.ignored(file_rel)
            target = posixpath.normpath(posixpath.join(workdir, file_rel))
            if is_dir and pattern is not None and not file_rel.endswith(".rs"):
                files.remove(file_rel)  # e.g. an editor's backup file; what sources include is checked on its own
                continue
            if pattern is not None:
                lines.append(f"{file_rel}: excluded from the build context by {shown(ignore_file, root)} pattern {pattern!r} ({why})")
            elif stage.files.get(target) != file_rel:
                copied = stage.files.get(target)
                lines.append(f"{file_rel}: not copied to {target} in stage {stage.name!r} ({why})"
                             + (f"; {target} is copied from {copied}" if copied else ""))
        if is_dir and lines and all(": not copied" in l for l in lines) and len(lines) == len(files):
            lines = [f"{rel}/: not copied to {image}/ in stage {stage.name!r} ({why})"]
        problems.extend(lines)
        if opts.verbose and not lines:
            print(f"  {rel}{'/' if is_dir else ''} -> {image}{'/' if is_dir else ''} ({why})")

    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(f"docker context ok: the {len(needed)} paths cargo build reads are in the context and copied "
          f"({shown(opts.dockerfile, root)}, {shown(ignore_file, root)})")


if __name__ == "__main__":
    main()
