#!/usr/bin/env python3
"""Where a request's instructions go, by the code that runs them.

    KEEP=1 PROXIES=gofe bash benches/callgrind.sh     # prints the kept directory
    python3 benches/callgrind_by_code.py DIR [h1 h2] [--functions]

Reads gofe's two callgrind outputs per protocol in DIR (gofe.P.N1.out, gofe.P.N2.out)
and prints, per request ((cost at N2 - cost at N1) / (N2 - N1)), the self cost grouped
by the source of every instruction. callgrind_annotate's inclusive view counts a
function's inlined callees as its own, so the request path's async functions seem to
cost what hyper, tokio and http do inside them; here an instruction counts for the
file its line is in (callgrind's fi=/fe= records), except that code inlined from Rust's
standard library counts for the crate of the function it was inlined into (a move in
hyper is hyper's). With --functions, gofe's own share is listed by function.
"""
import collections
import glob
import os
import re
import sys

# gofe's sources, as the debug info names them: absolute paths under the repository.
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..")) + "/"


def load(path):
    """Self cost by (owner file, function) from one callgrind output."""
    files, fns = {}, {}
    costs = collections.Counter()
    fl = cur = fn = None
    after_calls = False

    def name(table, value):
        m = re.match(r"\((\d+)\)(?: (.*))?", value)
        if not m:
            return value
        if m.group(2):
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), "?")

    for line in open(path, errors="replace"):
        if line.startswith("fl="):
            fl = cur = name(files, line[3:].strip())
        elif line.startswith(("fi=", "fe=")):
            cur = name(files, line[3:].strip())
        elif line.startswith("fn="):
            fn = name(fns, line[3:].strip())
            cur = fl
        elif line.startswith(("cfi=", "cfl=")):
            name(files, line[4:].strip())
        elif line.startswith("cfn="):
            name(fns, line[4:].strip())
        elif line.startswith("calls="):
            after_calls = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_calls:
                after_calls = False
                continue
            parts = line.split()
            if len(parts) < 2:
                continue
            owner = cur
            if owner and "/rustc/" in owner and fl and "/rustc/" not in fl:
                owner = fl
            costs[(owner, fn)] += int(parts[1])
    return costs


def group(path):
    if path is None:
        return "other"
    if path.startswith(REPO):
        return "gofe's own code"
    m = re.search(r"registry/src/[^/]+/([a-z0-9_\-]+)-\d", path)
    if m:
        crate = m.group(1)
        if crate in ("hyper", "h2", "httparse", "hyper-util", "want"):
            return "HTTP engines (hyper, h2, httparse)"
        if crate == "http":
            return "http (HeaderMap, Uri)"
        if crate in ("tokio", "mio", "tokio-util"):
            return "tokio, mio"
        if crate == "bytes":
            return "bytes"
        return "other crates"
    if "/rustc/" in path:
        return "Rust std, generic (drops, Pin polls, Arc)"
    if "malloc" in path:
        return "malloc, free"
    if "string" in path or "memmove" in path or "memcpy" in path:
        return "memcpy, memmove"
    return "libc, other"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not args:
        sys.exit(__doc__)
    directory, protocols = args[0], args[1:] or ["h1", "h2"]
    for proto in protocols:
        outs = glob.glob(f"{directory}/gofe.{proto}.*.out")
        runs = sorted((int(re.search(r"\.(\d+)\.out$", o).group(1)), o) for o in outs)
        if len(runs) < 2:
            sys.exit(f"{directory}: no two gofe.{proto}.N.out files")
        (n1, first), (n2, second) = runs[0], runs[-1]
        a, b = load(first), load(second)
        per = {k: (b[k] - a[k]) / (n2 - n1) for k in set(a) | set(b)}
        total = sum(per.values())
        groups = collections.Counter()
        for (owner, _), v in per.items():
            groups[group(owner)] += v
        print(f"{proto}: {total:,.0f} instructions per request")
        for g, v in groups.most_common():
            print(f"  {v:8,.0f}  {100 * v / total:5.1f}%  {g}")
        if "--functions" in sys.argv:
            ours = collections.Counter()
            for (owner, fn), v in per.items():
                if group(owner) == "gofe's own code":
                    ours[fn] += v
            print("  gofe's own, by function:")
            for fn, v in ours.most_common(25):
                print(f"    {v:6,.0f}  {fn[:110]}")


if __name__ == "__main__":
    main()
