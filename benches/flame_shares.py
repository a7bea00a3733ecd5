#!/usr/bin/env python3
"""Self time by component, read from an inferno flame graph SVG (benches/flame.sh).

    python3 benches/flame_shares.py benches/flame-two-hop-h2-after.svg [CATEGORY]

Each frame's own samples (its width less its children's) go to the component its name
names: h2, hyper, tokio, rustls, gofe, kernel/libc (C symbols)... Inlined code counts
for the function it was inlined into, as perf reports it. With CATEGORY, the frames of
that component with the most self time.
"""
import collections
import re
import sys
s = open(sys.argv[1]).read()
# inferno: <g><title>NAME (N samples, P%)</title><rect x="X%" y="Y" width="W%" .../>
frames = []
for m in re.finditer(r'<g><title>(.*?) \(([\d,]+) samples?, ([\d.]+)%\)</title><rect x="[\d.]+%" y="([\d.]+)" width="[\d.]+%" height="\d+" fill="[^"]*" fg:x="(\d+)" fg:w="(\d+)"', s):
    name, n, p, y, x, w = m.groups()
    frames.append((name, int(n.replace(',', '')), int(x), float(y), int(w)))
total = sum(n for name, n, x, y, w in frames if name in ('client-sidecar', 'server-sidecar'))
by_y = collections.defaultdict(list)
for f in frames:
    by_y[f[3]].append(f)
ys = sorted(by_y)
# children are one row closer to the top (smaller y in inferno's default, icicle=false: root at bottom)
step = min(b - a for a, b in zip(ys, ys[1:]))
def cat(name):
    rules = [('kernel/syscalls', ['[unknown]'] and ['entry_SYSCALL', 'do_syscall', '__x64_sys', 'tcp_', 'ip_', 'sock_', '__sys_', 'syscall']),
             ('rustls/ring (TLS)', ['rustls', 'ring::', 'ring_core']),
             ('h2', ['h2::']), ('hyper', ['hyper::', 'hyper_util']), ('tokio', ['tokio::', 'mio::']),
             ('gofe', ['gofe_proxy', 'gofe::', 'gofe_telemetry', 'gofe_identity']),
             ('alloc/memcpy (libc)', ['malloc', 'free', 'memcpy', 'memmove', 'realloc', '_int_']),
             ('http/bytes', ['http::', 'bytes::', 'httparse'])]
    for c, keys in rules:
        if any(k in name for k in keys):
            return c
    if '::' not in name and '{' not in name and '&lt;' not in name and name != '[unknown]':
        return 'kernel/libc (C symbols)'
    return 'other'
selfs = collections.Counter()
for (name, n, x, y, w) in frames:
    if name in ('client-sidecar', 'server-sidecar', 'all'):
        continue
    kids = [f for f in by_y.get(y - step, []) if f[2] >= x and f[2] + f[4] <= x + w]
    own = n - sum(k[1] for k in kids)
    selfs[cat(name)] += max(own, 0)
for c, n in selfs.most_common():
    print(f'{c}: {100*n/total:.1f}%')
print('total samples', total)
if len(sys.argv) > 2:
    top = collections.Counter()
    for (name, n, x, y, w) in frames:
        if name in ('client-sidecar', 'server-sidecar', 'all'):
            continue
        kids = [f for f in by_y.get(y - step, []) if f[2] >= x and f[2] + f[4] <= x + w]
        if cat(name) == sys.argv[2]:
            top[name[:90]] += n - sum(k[1] for k in kids)
    for nm, n in top.most_common(12):
        print(f'  {100*n/total:.1f}% {nm}')
