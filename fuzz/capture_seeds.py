#!/usr/bin/env python3
"""Captures real queries for the handler target's seed corpus: dig, glibc (getent),
musl (a static getaddrinfo program), c-ares (pycares), each asking a recorder on
127.0.0.1:53 inside a network namespace of its own (run under `unshare -n`, as root;
nothing leaves it). Each seed is the target's input: flags (0 UDP, 1 TCP), the query's
length, the query, then an upstream reply to it (one A record, ID patched)."""
import os, socket, struct, subprocess, sys, tempfile, threading

OUT = sys.argv[1] if len(sys.argv) > 1 else "corpus/handler"
NAMES = ["aliyun.com", "aliyun.com.default.svc.cluster.local", "payments.mesh.internal",
         "reviews", "example.org", "AliYun.COM"]
captured = []
phase = ["dig"]

def reply_for(q):
    end = 12
    while end < len(q) and q[end] != 0:
        end += 1 + q[end]
    end += 5
    r = bytearray(q[:end])
    r[2] |= 0x80; r[3] = 0x80
    r[6:12] = b"\x00\x01\x00\x00\x00\x00"
    r += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc6\x33\x64\x07"
    return bytes(r)

def serve_udp(sock):
    while True:
        q, peer = sock.recvfrom(4096)
        captured.append(("udp", q, phase[0]))
        sock.sendto(reply_for(q), peer)

def serve_tcp(sock):
    while True:
        c, _ = sock.accept()
        data = c.recv(65535)
        if len(data) >= 2:
            q = data[2:]
            captured.append(("tcp", q, phase[0]))
            r = reply_for(q)
            c.sendall(struct.pack(">H", len(r)) + r)
        c.close()

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 53))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", 53)); t.listen(16)
threading.Thread(target=serve_udp, args=(u,), daemon=True).start()
threading.Thread(target=serve_tcp, args=(t,), daemon=True).start()

def quiet(cmd, **kw):
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, **kw)

for n in NAMES:
    for extra in [[], ["+dnssec"], ["+noedns"], ["+tcp"], ["AAAA"], ["TXT"], ["ANY"], ["+cd", "+nord"]]:
        quiet(["dig", "@127.0.0.1", "+time=1", "+tries=1", n] + extra)
# glibc and musl read /etc/resolv.conf: a private one in a private mount namespace.
conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
conf.write("nameserver 127.0.0.1\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions timeout:1 attempts:1\n")
conf.close()
musl = None
src = tempfile.NamedTemporaryFile("w", suffix=".c", delete=False)
src.write('#include <netdb.h>\nint main(int c,char**v){struct addrinfo*r;for(int i=1;i<c;i++)getaddrinfo(v[i],0,0,&r);return 0;}\n')
src.close()
if subprocess.run(["musl-gcc", "-static", "-o", src.name + ".bin", src.name]).returncode == 0:
    musl = src.name + ".bin"
for n in NAMES:
    phase[0] = "glibc"
    quiet(["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f'mount --bind {conf.name} /etc/resolv.conf && getent ahosts {n}'])
    if musl:
        phase[0] = "musl"
        quiet(["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount --bind {conf.name} /etc/resolv.conf && {musl} {n}'])
try:
    import pycares, time
    phase[0] = "c-ares"
    ch = pycares.Channel(servers=["127.0.0.1"], timeout=1, tries=1)
    for n in NAMES:
        for qt in [pycares.QUERY_TYPE_A, pycares.QUERY_TYPE_AAAA, pycares.QUERY_TYPE_SRV]:
            ch.query(n, qt, callback=lambda *a: None)
    time.sleep(2)
except ImportError:
    print("pycares missing: no c-ares seeds", file=sys.stderr)

os.makedirs(OUT, exist_ok=True)
seen = set()
for proto, q, client in captured:
    if (client, proto, q[2:]) in seen:
        continue
    seen.add((client, proto, q[2:]))
    data = bytes([1 if proto == "tcp" else 0]) + struct.pack(">H", len(q)) + q + b"\x01" + reply_for(q)
    with open(os.path.join(OUT, f"{client}-{proto}-{len(seen):03d}"), "wb") as f:
        f.write(data)
print(f"{len(seen)} seeds in {OUT}")
