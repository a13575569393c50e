#!/usr/bin/env python3
"""gen_ledger: a large, valid audit ledger for timing `qm-audit verify`.

It BYPASSES THE SERVICE: it computes the hash chains itself, from the
definition in docs/audit.md (an independent implementation, so a clean
`verify` is also a cross-check of that definition), and writes rows in
PostgreSQL COPY text format for audit.ledger on stdout; the chain heads go to
the file named by --heads (COPY format for audit.chain_heads). Nothing here
goes through Kafka, the inbox or the outbox, and no checkpoints are made.

    gen_ledger.py -n 1000000 --chains 3 --heads heads.copy |
        psql "$DSN" -c "COPY audit.ledger FROM STDIN"
    psql "$DSN" -c "COPY audit.chain_heads FROM STDIN" < heads.copy

Records look like the service's: topic qm.requests.v1, a synthetic event type,
person p-0001..p-0300 assigned to chain CRC-32(person) mod chains, a random
payload of --size bytes.
"""
import argparse
import hashlib
import random
import struct
import sys
import zlib


def field(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, required=True, help="records in all")
    ap.add_argument("--chains", type=int, default=3)
    ap.add_argument("--size", type=int, default=150, help="payload bytes per record")
    ap.add_argument("--heads", required=True, help="file for the chain_heads COPY rows")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    rnd = random.Random(a.seed)
    people = [f"p-{i:04d}" for i in range(1, 301)]
    chain_of = {p: zlib.crc32(p.encode()) % a.chains for p in people}
    chain_ids = [f"chain-{c}" for c in range(a.chains)]
    prev = [bytes(32)] * a.chains
    seq = [0] * a.chains
    topic = b"qm.requests.v1"
    etype = b"qm.bench.synthetic.v1"
    source = b"/qm/bench"
    t0 = 1795000000000
    out = sys.stdout
    buf = []
    for i in range(a.n):
        person = people[i % len(people)]
        c = chain_of[person]
        seq[c] += 1
        s = seq[c]
        cid = chain_ids[c]
        rec_at = t0 + i
        ev_at = rec_at - 5
        event_id = f"{i:08x}-0000-4000-8000-{rnd.getrandbits(48):012x}"
        request_id = f"{rnd.getrandbits(32):08x}-1111-4000-8000-{i:012x}"
        payload = rnd.randbytes(a.size)
        h = hashlib.sha256(prev[c])
        h.update(field(cid.encode()) + field(str(s).encode()) + field(str(rec_at).encode()) +
                 field(topic) + field(event_id.encode()) + field(etype) + field(source) +
                 field(request_id.encode()) + field(person.encode()) + field(b"") +
                 field(request_id.encode()) + field(str(ev_at).encode()) + field(b"0") +
                 field(payload))
        digest = h.digest()
        buf.append(f"{cid}\t{s}\t{rec_at}\tqm.requests.v1\t{event_id}\tqm.bench.synthetic.v1\t"
                   f"/qm/bench\t{request_id}\t{person}\t\t{request_id}\t{ev_at}\tf\t"
                   f"\\\\x{payload.hex()}\t\\\\x{prev[c].hex()}\t\\\\x{digest.hex()}\n")
        prev[c] = digest
        if len(buf) >= 10000:
            out.write("".join(buf))
            buf.clear()
    out.write("".join(buf))
    with open(a.heads, "w") as f:
        for c in range(a.chains):
            f.write(f"{chain_ids[c]}\t{seq[c]}\t\\\\x{prev[c].hex()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
