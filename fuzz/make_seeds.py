#!/usr/bin/env python3
"""Writes the hand-made seed inputs of each fuzz target into corpus/<target>/seed-*.

The formats are described in each target's module doc. Run from fuzz/; the corpora
are then grown by `cargo xtask fuzz` and minimized with `cargo fuzz cmin`.
"""
import os
import struct

def write(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)

# --- vhost_user_backend -----------------------------------------------------------
def msg(req, body=b"", nfds=0, kind=0, need_reply=False):
    flags = 1 | (8 if need_reply else 0)
    return bytes([nfds | (kind << 3)]) + struct.pack("<III", req, flags, len(body)) + body

def u64(v):
    return struct.pack("<Q", v)

def state(i, n):
    return struct.pack("<II", i, n)

UVA = 0x7F0000000000
PROTO = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15)
FEAT = (1 << 32) | (1 << 29) | (1 << 30)
def gwrite(off, data):
    return bytes([0xA0]) + struct.pack("<HB", off, len(data)) + data

bring_up = b"".join([
    msg(1), msg(15), msg(16, u64(PROTO)), msg(3), msg(2, u64(FEAT)),
    msg(37, u64(0) + struct.pack("<QQQQ", 0, 0x10000, UVA, 0), nfds=1, kind=1, need_reply=True),
    msg(8, state(0, 8)),
    msg(9, struct.pack("<IIQQQQ", 0, 0, UVA + 0x1000, UVA + 0x3000, UVA + 0x2000, 0)),
    msg(10, state(0, 0)),
    msg(13, u64(0), nfds=1, kind=0),
    msg(12, u64(0), nfds=1, kind=0),
    msg(18, state(0, 1)),
])
chain = gwrite(0x1000, struct.pack("<QIHH", 0x8000, 100, 1, 1) + struct.pack("<QIHH", 0x9000, 64, 2, 0)) \
    + gwrite(0x2004, struct.pack("<H", 0)) + gwrite(0x2002, struct.pack("<H", 1)) + bytes([0x80])
write("vhost_user_backend", "bring-up", bring_up)
write("vhost_user_backend", "bring-up-chain", bring_up + chain + msg(11, state(0, 0)))
write("vhost_user_backend", "config", msg(1) + msg(15) + msg(16, u64(PROTO)) + msg(24, struct.pack("<III", 0, 8, 0) + bytes(8)))
write("vhost_user_backend", "mem-table", msg(3) + msg(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0x10000, UVA, 0), nfds=1, kind=1) + msg(38, u64(0) + struct.pack("<QQQQ", 0, 0x10000, UVA, 0)))
write("vhost_user_backend", "reconnect", bring_up + bytes([0xF0]) + bring_up)

# --- frontend_replies ---------------------------------------------------------------
def reply(req, body=b"", nfds=0, kind=0):
    return bytes([nfds | (kind << 3)]) + struct.pack("<III", req, 1 | 4, len(body)) + body

def call(op, args=b""):
    return bytes([op]) + args.ljust(24, b"\0")

calls = [call(0), call(1), call(2, u64(PROTO | (1 << 6) | (1 << 16) | (1 << 17) | (1 << 22))), call(4), call(7, bytes([0, 8])), call(6, bytes([0]))]
replies = reply(1, u64(FEAT)) + reply(15, u64(PROTO | (1 << 6) | (1 << 16) | (1 << 17) | (1 << 22))) + reply(17, u64(2)) \
    + reply(24, struct.pack("<III", 0, 8, 0) + b"echo-cfg") + reply(11, state(0, 5))
chan = b"\x80" + bytes([0]) + struct.pack("<III", 2, 1 | 8, 0) \
    + bytes([1 | (1 << 3)]) + struct.pack("<III", 9, 1 | 8, 40) + struct.pack("<B7xQQQQ", 0, 0, 0, 0x1000, 1) \
    + bytes([0]) + struct.pack("<III", 10, 1 | 8, 40) + struct.pack("<B7xQQQQ", 0, 0, 0, 0x1000, 1)
write("frontend_replies", "negotiate", bytes([0xFF, len(calls)]) + b"".join(calls) + replies + chan)
write("frontend_replies", "fd-replies", bytes([0x0F, 3]) + call(13) + call(12, bytes([1, 0, 1])) + call(15)
      + reply(28, b"", 1, 1) + reply(31, struct.pack("<QQHHI", 4096, 0, 1, 256, 0), 1, 1) + reply(42, u64(0), 1, 0))

# --- vsock_queue ----------------------------------------------------------------------
def qop(base, q):
    for op in range(base, base + 0x20):
        if op % 3 == q:
            return op
def desc(q, idx, addr, ln, flags, nxt):
    return bytes([qop(0x40, q), idx]) + struct.pack("<IIHH", addr, ln, flags, nxt)
def avail(q, head):
    return bytes([qop(0x60, q)]) + struct.pack("<H", head)
def kick(q):
    return bytes([qop(0xA0, q)])
def vhdr(off, src_port, dst_port, op, ln=0, buf_alloc=65536, fwd=0, ty=1):
    h = struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, ln, ty, op, 0, buf_alloc, fwd)
    return bytes([0x90]) + struct.pack("<H", off) + h

rx = desc(0, 0, 0x2000, 44 + 4096, 2, 0) + desc(0, 1, 0x4000, 44 + 4096, 2, 0) + avail(0, 0) + avail(0, 1) + kick(0)
req = bytes([0xD0]) + desc(1, 0, 0x6000, 44, 0, 0) + vhdr(0x6000, 5000, 1000, 1) + avail(1, 0) + kick(1) + bytes([0xB0])
rw = desc(1, 1, 0x7000, 44, 1, 2) + desc(1, 2, 0x8000, 16, 0, 0) + vhdr(0x7000, 5000, 1000, 5, 16) + avail(1, 1) + kick(1) + bytes([0xB0])
write("vsock_queue", "request-rw", bytes([3]) + rx + req + rw)
write("vsock_queue", "host-connect", bytes([1]) + rx + bytes([0xC0]) + struct.pack("<H", 77) + kick(0) + bytes([0xB0]))
ind = desc(1, 3, 0x9000, 32, 4, 0) + bytes([0x00]) + struct.pack("<HB", 0x9000, 32) + struct.pack("<QIHHQIHH", 0xA000, 44, 1, 1, 0xA100, 8, 0, 0) \
    + vhdr(0xA000, 5001, 1001, 1) + avail(1, 3) + kick(1)
write("vsock_queue", "indirect", bytes([1]) + rx + ind)
write("vsock_queue", "credit", bytes([3]) + rx + req + desc(1, 4, 0x6100, 44, 0, 0) + vhdr(0x6100, 5000, 1000, 7) + avail(1, 4) + kick(1) + kick(0) + bytes([0xE0]) + rx)

# --- media_commands -------------------------------------------------------------------
def ioctl(slot, nr, arg, room=4096, cap_type=True):
    op = 0x40 | slot | (4 if cap_type else 0)
    return bytes([op, nr]) + struct.pack("<HH", room, len(arg)) + arg
fmt = struct.pack("<II", 0, 1) + bytes(56)
reqbufs = struct.pack("<IIIII", 4, 1, 1, 0, 0)
buf = struct.pack("<II", 0, 1).ljust(88, b"\0")
buf = buf[:60] + struct.pack("<I", 1) + buf[64:]
write("media_commands", "stream", bytes([0xA0]) + ioctl(0, 2, fmt) + ioctl(0, 4, struct.pack("<I", 1) + bytes(204)) + ioctl(0, 8, reqbufs)
      + ioctl(0, 9, buf) + ioctl(0, 15, buf) + ioctl(0, 18, struct.pack("<I", 1)) + bytes([0xF0, 0xF0]) + ioctl(0, 19, struct.pack("<I", 1)) + bytes([0xB0]))
write("media_commands", "mmap", bytes([0xA1]) + ioctl(1, 8, reqbufs) + bytes([0xC1]) + struct.pack("<BI", 1, 0) + bytes([0xC1]) + struct.pack("<Q", 0x100000000))
write("media_commands", "raw", bytes([0x00]) + struct.pack("<HH", 64, 8) + struct.pack("<II", 1, 0) + bytes([0x00]) + struct.pack("<HH", 64, 4) + struct.pack("<I", 9))
userptr = reqbufs[:8] + struct.pack("<I", 2) + reqbufs[12:]
write("media_commands", "userptr", bytes([0xA2]) + ioctl(2, 8, userptr) + bytes([0xD0]) + struct.pack("<IB", 0x1000, 16) + bytes(16)
      + ioctl(2, 15, struct.pack("<II", 0, 1).ljust(60, b"\0") + struct.pack("<IQI", 2, 0x80000, 4096) + bytes(12)))

# --- media_proxy ------------------------------------------------------------------------
# The same program as media_commands (its seeds), and multi-planar ones for vivid's
# multi-planar node (buffer type 9, the planes after the buffer).
for name in ["stream", "mmap", "raw", "userptr"]:
    with open(os.path.join("corpus", "media_commands", "seed-" + name), "rb") as f:
        write("media_proxy", name, f.read())
def mp_buf(memory, planes):
    b = struct.pack("<II", 0, 9).ljust(88, b"\0")
    b = b[:60] + struct.pack("<I", memory) + b[64:72] + struct.pack("<I", len(planes)) + b[76:]
    return b + b"".join(planes)
plane = bytes(64)
mp_req = struct.pack("<IIIII", 2, 9, 1, 0, 0)
write("media_proxy", "mplane-stream", bytes([0xA0]) + ioctl(0, 4, struct.pack("<I", 9) + bytes(204), cap_type=False)
      + ioctl(0, 5, struct.pack("<I", 9) + bytes(204), cap_type=False) + ioctl(0, 8, mp_req, cap_type=False)
      + ioctl(0, 9, mp_buf(1, [plane]), cap_type=False) + ioctl(0, 15, mp_buf(1, [plane]), cap_type=False)
      + ioctl(0, 18, struct.pack("<I", 9), cap_type=False) + bytes([0xF0, 0xF0, 0xF0])
      + ioctl(0, 19, struct.pack("<I", 9), cap_type=False) + bytes([0xB0]))
# USERPTR: an SG list covering each plane's length follows the buffer and its planes
# (one entry: guest address 0x80000, 4096 bytes).
sg = struct.pack("<QII", 0x80000, 4096, 0)
up_plane = struct.pack("<IIQ", 0, 4096, 0).ljust(64, b"\0")
write("media_proxy", "mplane-userptr", bytes([0xA1]) + ioctl(1, 8, struct.pack("<IIIII", 2, 9, 2, 0, 0), cap_type=False)
      + ioctl(1, 15, mp_buf(2, [up_plane]) + sg, cap_type=False) + ioctl(1, 18, struct.pack("<I", 9), cap_type=False)
      + bytes([0xF0, 0xF0]))
sp_buf = struct.pack("<II", 0, 1).ljust(60, b"\0") + struct.pack("<IQI", 2, 0, 4096) + bytes(12)
write("media_proxy", "userptr-sg", bytes([0xA2]) + ioctl(2, 8, struct.pack("<IIIII", 2, 1, 2, 0, 0), cap_type=False)
      + ioctl(2, 15, sp_buf + sg, cap_type=False) + ioctl(2, 18, struct.pack("<I", 1), cap_type=False)
      + bytes([0xF0, 0xF0]))

# --- connect_line ---------------------------------------------------------------------
for i, (mode, split, line) in enumerate([(0, 255, b"CONNECT 1234\n"), (1, 255, b"connect 5\n"), (0, 4, b"CONNECT 12\nhello"),
                                          (0, 255, b"CONNECT 1234"), (1, 255, b"CONNECT\t4294967295"), (0, 255, b"CONNECT 4294967296\n")]):
    write("connect_line", str(i), bytes([mode, split]) + line)

# --- vsock_config ---------------------------------------------------------------------
write("vsock_config", "vm", b"guest-cid=3,socket=/tmp/vhost.sock,uds-path=/tmp/vm.vsock,tx-buffer-size=0x40000,queue-size=256,groups=a+b")
write("vsock_config", "yaml", b"""vms:
  - guest_cid: 4
    socket: "/tmp/vhost4.socket"   # comment
    uds_path: '/tmp/vm4.vsock'
    tx_buffer_size: 65536
    queue_size: 1024
    groups: group1+group2
  - guest_cid: 5
    socket: /tmp/vhost5.socket
    uds_path: /tmp/vm5.vsock
---
""")

write("vsock_config", "forward", b"guest-cid=4,socket=/tmp/vhost4.socket,forward-cid=1,forward-listen=9001+9002,queue-size=1024")
write("vsock_config", "forward-yaml", b"""vms:
  - guest_cid: 4
    socket: /tmp/vhost4.socket
    forward_cid: 1
    forward_listen: 9001+9002
  - socket: /tmp/vhost5.socket
    forward-cid: 2
    forward-listen: 7
""")

# --- proxy_ring -----------------------------------------------------------------------
ring = bytes([0]) + b"".join(bytes([0x40 + s]) + struct.pack("<II", 1, 4) for s in range(8)) + bytes([0x80] * 10) \
    + bytes([0x60]) + struct.pack("<II", 0, 0) + bytes([1]) + bytes([0x00]) + struct.pack("<HI", 80 + 16, 40) + bytes([0x40]) + struct.pack("<II", 2, 8)
write("proxy_ring", "ring", ring)
write("proxy_ring", "cold-inline", bytes([1, 0]) + struct.pack("<H", 20) + b'I{"Snapshot":null}  ')
write("proxy_ring", "cold-memfd", bytes([1, 3]) + struct.pack("<H", 9) + b"M" + struct.pack("<Q", 12) + b'{"a":[1,2,3]}')
