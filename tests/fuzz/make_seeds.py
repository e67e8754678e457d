#!/usr/bin/env python3
"""Writes the hand-made seeds of tests/fuzz/corpus/ (run from anywhere).

Each seed is a short, meaningful input the fuzzer mutates from: valid
records for the codecs, key and batch programs, and scenario programs for
the engine operation fuzzer in the encoding engine_ops_fuzzer.cc reads.
The committed corpus also holds inputs the fuzzer found and kept
(merged with -merge=1); rerunning this script only rewrites the seed-*
files.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


def write_repro(target, bug, data):
    """A reproducer of a known engine bug (see known_engine_bugs.txt)."""
    d = os.path.join(HERE, "repro")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, target + "-" + bug), "wb") as f:
        f.write(bytes(data))


# ---- protobuf wire format, for the codec seeds ---------------------------

def varint(v):
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(n, v):
    return varint(n << 3) + varint(v)


def field_bytes(n, b):
    return varint((n << 3) | 2) + varint(len(b)) + b


def field_fixed64(n, v):
    return varint((n << 3) | 1) + struct.pack("<Q", v)


def be64(v):
    return struct.pack(">Q", v & ((1 << 64) - 1))


def codec_seeds():
    t = "log_codec_fuzzer"
    expiry = be64(1_800_000_000_000_000)
    message = (field_varint(1, 1) + field_varint(2, 0x1234567890) +
               field_varint(3, 1_700_000_000_000_000) + field_varint(4, 1) +
               field_varint(5, 10) + field_bytes(6, b"c-1") +
               field_bytes(7, b"hello\x00\xff") + field_bytes(8, b"text/plain") +
               field_varint(9, 7) + field_bytes(10, b"blob://a") +
               field_bytes(10, b"blob://b"))
    write(t, "log-message", b"\x00" + expiry + message)
    packed = field_bytes(11, varint(1) + varint(2) + varint(300))
    created = field_varint(1, 2) + field_varint(2, 99) + field_varint(4, 1) + packed
    write(t, "log-created", b"\x00" + be64(0) + created)
    unpacked = field_varint(1, 3) + field_varint(11, 5) + field_varint(11, 6)
    write(t, "log-added-unpacked", b"\x08" + be64(0) + unpacked)
    unknown = field_varint(1, 4) + field_varint(20, 1) + field_fixed64(21, 5) + field_bytes(22, b"x")
    write(t, "log-unknown-fields", b"\x00" + be64(0) + unknown)
    dedup = (field_varint(1, 7) + field_varint(2, 3) + field_varint(3, 0x55) +
             field_varint(4, 1_700_000_000_000_000) + field_fixed64(5, 0xDEADBEEF))
    write(t, "dedup", b"\x01" + expiry + dedup)
    meta = (field_varint(1, 2) + field_varint(2, 3600) +
            field_varint(3, 1_700_000_000_000_000) + field_varint(4, 3) +
            field_varint(5, 2))
    write(t, "meta", b"\x02" + meta)
    write(t, "meta-negative-retention", b"\x02" + field_varint(1, 1) + field_varint(2, -5))
    interval = field_varint(1, 1) + field_varint(2, 4)
    open_interval = field_varint(1, 7)
    write(t, "members", b"\x03" + field_bytes(1, interval) + field_bytes(1, open_interval))
    rng = field_varint(1, 3) + field_varint(2, 0) + field_varint(3, 12)
    write(t, "read-ranges", b"\x04" + field_bytes(1, rng) + field_bytes(1, rng))
    write(t, "index", b"\x05" + be64(0) + be64(42) + be64(7))
    write(t, "u64", b"\x06" + be64(123456789))
    write(t, "all", b"\x07" + expiry + message)


def key_seeds():
    t = "key_fuzzer"
    write(t, "primitives", b"\x00" + be64(1) + b"\x85\x01abc\xff\xff")
    write(t, "primitives-ff", b"\x00" + b"\xff" * 9)
    # Two id tuples that share user and device but not conversation.
    write(t, "layout", b"\x01" + bytes([1, 2, 3, 4, 5, 6, 1, ord("a")]) +
          bytes([1, 2, 2, 4, 5, 6, 2, ord("a"), ord("b")]))
    write(t, "layout-max", b"\x01" + bytes([0xF0] * 6) + b"\x00" + bytes([0xF8]) +
          be64(2**63) + bytes([0] * 5) + b"\x00")
    write(t, "parse-cursor", b"\x02\x06" + be64(5) + b"D" + be64(9) + b"c" + be64(3))
    write(t, "parse-delivered", b"\x02\x06" + be64(5) + b"d" + be64(3) + be64(9))
    write(t, "parse-meta", b"\x02\x00c" + be64(77))
    write(t, "parse-dedup", b"\x02\x03" + be64(1) + be64(2) + b"client")
    write(t, "parse-meta-seq-limit", b"\x02\x00s" + be64(5))
    write(t, "parse-meta-open", b"\x02\x00o")
    write(t, "parse-meta-format-version", b"\x02\x00v")
    write(t, "parse-log", b"\x02\x01" + be64(3) + be64(9))
    write(t, "parse-user-stream-short", b"\x02\x05" + be64(3) + b"\x01")
    write(t, "parse-device-user", b"\x02\x06" + be64(5) + b"D" + be64(9) + b"u")
    write(t, "parse-device-sync-long", b"\x02\x06" + be64(5) + b"D" + be64(9) + b"s" + be64(3) + b"x")


def batch_seeds():
    t = "write_batch_fuzzer"
    put = lambda space, key, value: bytes([0, space, 0x80 | 0, len(key)]) + key + bytes([len(value)]) + value
    small_put = lambda space, k, value: bytes([1, space, k, len(value)]) + value
    delete = lambda space, k: bytes([2, space, k])
    write(t, "put-delete-write", put(1, b"k1", b"v1") + small_put(1, 1, b"v") +
          delete(1, 1) + bytes([7, 0]) + bytes([6, 0, 1, 0, 0, 0]))
    write(t, "append-self", small_put(3, 2, b"x") + bytes([3, 0, 1]) + bytes([7, 0]) +
          bytes([0x83, 0, 0]) + bytes([0x87, 0]) + bytes([6, 0, 0, 1, 2, 3]))
    write(t, "copy-clear", small_put(2, 3, b"abc") + bytes([5, 0]) + bytes([4, 0]) +
          small_put(2, 4, b"") + bytes([7, 0]) + bytes([6, 0, 1, 4, 0, 3]))
    write(t, "every-space", b"".join(small_put(s, s, b"v%d" % s) for s in range(8)) +
          bytes([6, 0, 1, 0, 0, 0]))


# ---- engine_ops_fuzzer programs ------------------------------------------

def u(x):  # user 1..6
    return x - 1


CONVERSATIONS = [1, 2, 3, 22, 23]  # kConversationIds


def c(x):  # conversation id -> its byte
    return CONVERSATIONS.index(x)


def dv(x):  # device 1..3
    return x - 1


ZERO = 0xFF  # the byte that reads as id 0
FAIL = 0x80  # opcode flag: the next storage write fails

CID = {"a": 0, "b": 1, "c": 2, "d": 3, "": 4, "long": 5}
PAYLOAD = {"x": 0, "y": 1, "hello": 2, "bin": 3, "": 4, "long": 5}
RETENTION = {0: 0, 1: 1, 60: 2, 3600: 3, 259200: 4, -1: 5, "huge": 6}
ADVANCE = {"1ms": 0, "1s": 1, "1min": 2, "1h": 3, "1d": 4, "3d": 5}


def md(ct=0, reply=0, att=0):
    """content type 0/1 '' 2 't' 3 too long; reply 0/1 none 2 '1' 3 '999';
    attachments 0/1 none, 2 [a], 3 [a,bb], 4 [''], 5 three, 6 too long."""
    return ct | (reply << 2) | (att << 4)


def create(conv, creator, members, kind="group", retention=0, flags=0):
    k = {"direct": 0, "group": 1, "unknown": 4}[kind]
    return bytes([0 | flags, conv, k, creator, len(members)] + members +
                 [RETENTION[retention]])


def add(conv, actor, user, flags=0):
    return bytes([1 | flags, conv, actor, user])


def remove(conv, actor, user, flags=0):
    return bytes([2 | flags, conv, actor, user])


def send(sender, device, conv, cid="a", payload="x", meta=0, flags=0):
    return bytes([3 | flags, sender, device, conv, CID[cid], PAYLOAD[payload], meta])


def retry(pick, same=True, change=0, flags=0):
    return bytes([(4 if same else 5) | flags, pick, change])


def read(reader, conv, frm=0, limit=0, forward=True):
    return bytes([6 if forward else 7, reader, conv, frm, limit])


def get_message(reader, pick):
    return bytes([8, reader, pick])


def mark_read(user, device, conv, b, flags=0):
    return bytes([9 | flags, user, device, conv, b])


def read_state(user, conv):
    return bytes([10, user, conv])


def head(reader, conv):
    return bytes([11, reader, conv])


def members(conv, user):
    return bytes([12, conv, user])


def mode(conv):
    return bytes([13, conv])


def set_retention(conv, retention, flags=0):
    return bytes([14 | flags, conv, RETENTION[retention]])


def advance(what):
    return bytes([15, ADVANCE[what]])


def restart(probe=False):
    return bytes([16, 1 if probe else 0])


def power_loss(while_open):
    """Unsynced writes are dropped with the engine running, or after Close."""
    return bytes([17, 1 if while_open else 0])


def reclaim():
    return bytes([18])


def toggle_denied(user):
    """The authorizer starts (or stops) denying this user's sends."""
    return bytes([19, user])


def program(sync, *ops):
    return bytes([1 if sync else 0]) + b"".join(ops)


def ops_seeds():
    t = "engine_ops_fuzzer"
    a, b_, cc, d = u(1), u(2), u(3), u(4)
    c1, c2 = c(1), c(2)
    p1, p2 = dv(1), dv(2)
    write(t, "send-retry-read", program(
        False,
        create(c1, a, [b_]),
        send(a, p1, c1, "a", "x"),
        retry(0, same=True),
        retry(0, same=False, change=0),
        send(b_, p1, c1, "a", "y"),
        read(b_, c1), read(b_, c1, forward=False),
        get_message(b_, 1), get_message(b_, 3), get_message(b_, 4),
        mark_read(b_, p1, c1, 2), read_state(b_, c1), read_state(a, c1),
        head(a, c1), members(c1, a), mode(c1),
        restart(probe=True),
        retry(0, same=True), read(a, c1, limit=1), read(a, c1, frm=2, limit=1)))
    write(t, "membership-windows", program(
        False,
        create(c1, a, [b_]),
        send(a, p1, c1, "a"),
        add(c1, a, cc), mode(c1),
        send(cc, p1, c1, "b"),
        remove(c1, a, b_),
        send(a, p2, c1, "c"),
        send(b_, p1, c1, "d"),
        add(c1, a, b_), add(c1, a, b_),
        send(a, p1, c1, "d", "hello"),
        read(b_, c1, limit=6), read(b_, c1, forward=False, limit=6),
        members(c1, b_), read_state(b_, c1), head(b_, c1),
        remove(c1, a, b_), remove(c1, a, b_), head(b_, c1),
        add(c1, a, d), add(c1, a, u(5)), mode(c1),
        restart(), read(cc, c1, limit=6)))
    write(t, "direct", program(
        True,
        create(c2, a, [b_], kind="direct"),
        create(c2, a, [b_], kind="direct"),
        create(c1, a, [], kind="direct"),
        create(c1, a, [b_, cc], kind="direct"),
        add(c2, a, cc), remove(c2, a, b_),
        send(a, p1, c2, "a"), send(cc, p1, c2, "b"),
        read(cc, c2), get_message(cc, 1), mode(c2)))
    write(t, "expiry-dedup", program(
        False,
        create(c1, a, [b_], retention=60),
        send(a, p1, c1, "a", "x"),
        advance("1min"),
        read(b_, c1), get_message(b_, 1),
        retry(0, same=True),
        set_retention(c1, 0),
        send(a, p1, c1, "b", "y"),
        advance("1d"),
        retry(0, same=True), retry(0, same=False),
        read(a, c1, limit=6), reclaim(), read(a, c1, limit=6),
        advance("3d"), read(a, c1, limit=6), get_message(a, 1),
        restart(), read(a, c1, limit=6)))
    write(t, "faults", program(
        False,
        create(c1, a, [b_], flags=FAIL),
        create(c1, a, [b_]),
        send(a, p1, c1, "a", flags=FAIL),
        send(a, p1, c1, "a", "y"),
        retry(1, same=True, flags=FAIL),
        add(c1, a, cc, flags=FAIL), remove(c1, a, b_, flags=FAIL),
        mark_read(b_, p1, c1, 2, flags=FAIL), read_state(b_, c1),
        set_retention(c1, 60, flags=FAIL),
        send(b_, p2, c1, "a"), read(b_, c1, limit=6)))
    write(t, "power-loss-sync", program(
        True,
        create(c1, a, [b_, cc]),
        send(a, p1, c1, "a"), send(b_, p1, c1, "a"),
        mark_read(cc, p1, c1, 3),
        power_loss(while_open=True),
        retry(0, same=True), retry(1, same=True), read_state(cc, c1),
        read(cc, c1, limit=6)))
    write(t, "power-loss-buffered", program(
        False,
        create(c1, a, [b_]),
        send(a, p1, c1, "a"), add(c1, a, cc), mark_read(b_, p1, c1, 2),
        power_loss(while_open=False),
        retry(0, same=True), read(cc, c1), read_state(b_, c1)))
    write(t, "power-loss-buffered-running", program(
        False,
        create(c1, a, [b_]), send(a, p1, c1, "a"), restart(),
        send(a, p1, c1, "b"), add(c1, a, cc), mark_read(b_, p1, c1, 2),
        create(c2, a, [cc]),
        power_loss(while_open=True),
        retry(0, same=True), retry(1, same=True), read(cc, c1), read(a, c1),
        read_state(b_, c1), send(a, p1, c1, "c"), read(a, c1, limit=6)))
    write(t, "bad-requests", program(
        False,
        create(ZERO, a, [b_]), create(c1, ZERO, [b_]), create(c1, a, [ZERO]),
        create(c1, a, [b_], retention=-1), create(c1, a, [b_], kind="unknown"),
        create(c1, a, [b_, cc, d, u(5)]),
        create(c1, a, [b_, cc, d]),
        add(c1, a, u(5)),
        send(ZERO, p1, c1), send(a, ZERO, c1), send(a, p1, ZERO),
        send(a, p1, c1, ""), send(a, p1, c1, "long"),
        send(a, p1, c1, "a", "long"), send(a, p1, c1, "a", ""),
        send(a, p1, c1, "a", "", md(att=2)),
        send(a, p1, c1, "b", "x", md(ct=3)),
        send(a, p1, c1, "b", "x", md(att=4)),
        send(a, p1, c1, "b", "x", md(att=5)),
        send(a, p1, c1, "b", "x", md(att=6)),
        send(a, p1, c1, "b", "x", md(ct=2, reply=3, att=3)),
        send(u(6), p1, c1, "c"), send(a, p1, c2, "c"),
        read(a, c1, limit=7), read(a, c1, limit=0xF0), read(u(6), c1), read(a, c2),
        mark_read(a, p1, c1, 0), mark_read(a, p1, c1, 9), mark_read(u(6), p1, c1, 1),
        set_retention(c2, 60), set_retention(c1, -1),
        head(u(6), c1), head(a, c2), read_state(u(6), c1), members(c2, a)))
    c22, c23 = c(22), c(23)
    write(t, "evictions", program(
        False,
        create(c1, a, [b_]), create(c22, a, [cc]), create(c2, b_, [d]),
        create(c23, cc, [d]),
        send(a, p1, c1, "a"), send(a, p1, c22, "b"), send(b_, p1, c2, "a"),
        send(d, p1, c23, "a"), add(c1, a, d), send(cc, p1, c22, "c"),
        read(b_, c1), read(cc, c22), mark_read(d, p1, c1, 4), read_state(d, c1),
        restart(), send(a, p1, c22, "b"), read(d, c23)))
    write(t, "authorizer", program(
        False,
        create(c1, a, [b_]),
        toggle_denied(b_),
        send(b_, p1, c1, "a"), send(a, p1, c1, "a"),
        send(b_, p1, c1, "a", "y"),
        toggle_denied(a), retry(1, same=True), send(a, p1, c1, "b"),
        toggle_denied(a), toggle_denied(b_), retry(0, same=True),
        read(a, c1, limit=6)))

    # Reproducers of the open engine bugs (known_engine_bugs.txt).
    write_repro(t, "huge-retention", program(
        False, create(c1, a, [b_], retention="huge")))
    # Bugs it found that are fixed: regression seeds.
    write(t, "fixed-authorizer-first", program(
        False, create(c1, a, [b_]), toggle_denied(cc), send(cc, p1, c1, "a")))
    write(t, "fixed-cache-bound", program(
        False, create(c1, a, [b_]), create(c2, a, [b_]), create(c(3), a, [b_])))


def main():
    codec_seeds()
    key_seeds()
    batch_seeds()
    ops_seeds()


if __name__ == "__main__":
    main()
