#!/usr/bin/env python3
"""A small, fast SMTP sink for the benchmarks (benches/bench.py), run as its own process.

    python3 benches/fastsink.py 127.0.0.1:2525 [--verify]

It accepts every transaction and throws the data away, like Postfix's smtp-sink, but reads
DATA with recv_into a 4 MiB buffer and finds the terminator with bytearray.find (no
per-line Python work on bodies; a terminator split across reads is found through the last
4 bytes of the previous read).  Postfix's smtp-sink reads only 200-350 MB/s, which bounded
the end-to-end cells of the bench; this one reads at roughly the loopback copy rate.

Protocol: 220 greeting; EHLO (PIPELINING, 8BITMIME, SIZE, ENHANCEDSTATUSCODES; no
CHUNKING), LHLO, HELO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT; the replies of a pipelined
group are sent together; commands that arrive in the same read as the end of the data are
served from that read.  Every connection is non-blocking and served by one selector loop.

Counters go to stdout the way ``smtp-sink -c`` reports them (one record per message
received and per session ended), plus fields of its own:

    sess=<sessions ended> quit=<QUITs> mesg=<messages received> rcpt=<recipients of that
    message> t=<time.monotonic() when its terminator was read>

(CLOCK_MONOTONIC is system-wide, so the bench can use t directly.)  With --verify each
message record also has size= and sha256= of the message body (everything after the first
empty line, dot-stuffing undone): slower, for byte checks, never for timing.

SIGTERM or SIGINT ends it (exit status 0).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import selectors
import signal
import socket
import sys
import time

BUFSIZE = 4 << 20
MAX_LINE = 64 << 10
END = b"\r\n.\r\n"
EHLO = (b"250-fastsink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n"
        b"250 ENHANCEDSTATUSCODES\r\n")


def find_end(buf: bytearray, end: int) -> int:
    """buf.find(END, 0, end), faster for bodies with few dots (base64 has none): a one-byte
    find is a memchr for the "." of the terminator, several GB/s, where a search for the
    5-byte pattern stops at every CRLF and runs at about 2 GB/s.  After a few dots that are
    not a terminator's, the rest of the buffer is searched for the pattern itself."""
    pos = 0
    for _ in range(16):
        j = buf.find(b".", pos, end)
        if j < 0:
            return -1
        if j >= 2 and buf.startswith(END, j - 2, end):
            return j - 2
        pos = j + 1
    return buf.find(END, max(0, pos - 3), end)


class Body:
    """--verify: undoes dot-stuffing and hashes what follows the header block.  Fed the DATA
    stream (terminator excluded, its CRLF included) in pieces that end anywhere."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = bytearray()
        self.in_head = True
        self.pending = b"\r\n"  # a virtual line end before the first line
        self.skip = 2  # ... which is not part of the message

    def feed(self, data: bytes, final: bool = False) -> None:
        p = self.pending + data
        cut = len(p)
        if not final:
            # Keep back the last 3 bytes (they may begin a "\r\n.." still incomplete) and a
            # whole "\r\n.." that would straddle the cut.
            cut = max(0, len(p) - 3)
            for j in range(max(0, cut - 3), cut):
                if p.startswith(b"\r\n..", j):
                    cut = j
                    break
        part, self.pending = p[:cut].replace(b"\r\n..", b"\r\n."), p[cut:]
        if self.skip:
            n = min(self.skip, len(part))
            part, self.skip = part[n:], self.skip - n
        if self.in_head:
            start = max(0, len(self.head) - 3)
            self.head += part
            k = self.head.find(b"\r\n\r\n", start)
            if k < 0:
                return
            part = bytes(self.head[k + 4:])
            del self.head[k + 2:]
            self.in_head = False
        self.sha.update(part)
        self.size += len(part)

    def finish(self, data: bytes, drop: int) -> None:
        """The last piece.  ``drop``: how many bytes already fed (still held back, the last
        3 always are) turned out to belong to the terminator."""
        if drop:
            self.pending = self.pending[: len(self.pending) - drop]
        self.feed(data, final=True)


class Conn:
    __slots__ = ("sock", "inbuf", "out", "data", "tail", "mail", "rcpts", "body", "closing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()  # command bytes not yet served
        self.out = bytearray()  # replies not yet sent
        self.data = False  # between 354 and the terminator
        self.tail = b""  # in DATA: the last (up to 4) bytes of the stream so far
        self.mail = False
        self.rcpts = 0
        self.body: Body | None = None
        self.closing = False


class Sink:
    def __init__(self, host: str, port: int, verify: bool, size: bool = True) -> None:
        self.verify = verify
        self.ehlo = EHLO if size else EHLO.replace(b"250-SIZE 0\r\n", b"")
        self.sel = selectors.DefaultSelector()
        self.lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, port))
        self.lsock.listen(1024)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ)
        self.buf = bytearray(BUFSIZE + 8)
        self.view = memoryview(self.buf)
        self.sess = 0
        self.quit = 0
        self.mesg = 0

    def port(self) -> int:
        return int(self.lsock.getsockname()[1])

    def report(self, rcpts: int = 0, t: float = 0.0, extra: str = "") -> None:
        line = f"sess={self.sess} quit={self.quit} mesg={self.mesg} rcpt={rcpts}"
        if t:
            line += f" t={t:.6f}"
        os.write(1, (line + extra + "\n").encode())

    # -- event loop ---------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            for key, mask in self.sel.select(1.0):
                if key.data is None:
                    self.accept()
                    continue
                c: Conn = key.data
                try:
                    if mask & selectors.EVENT_WRITE:
                        self.flush(c)
                    if mask & selectors.EVENT_READ and c.sock.fileno() >= 0:
                        self.readable(c)
                except OSError:
                    self.close(c)

    def accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(sock)
            self.sel.register(sock, selectors.EVENT_READ, c)
            c.out += b"220 fastsink ESMTP\r\n"
            try:
                self.flush(c)
            except OSError:
                self.close(c)

    def close(self, c: Conn) -> None:
        if c.sock.fileno() < 0:
            return
        self.sel.unregister(c.sock)
        c.sock.close()
        self.sess += 1
        self.report()

    def flush(self, c: Conn) -> None:
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                break
            del c.out[:n]
        if c.out:
            self.sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
            return
        if c.closing:
            self.close(c)
        else:
            self.sel.modify(c.sock, selectors.EVENT_READ, c)

    def readable(self, c: Conn) -> None:
        if c.closing:  # QUIT seen: drain what the client still sends, answer nothing
            if not c.sock.recv_into(self.view[:BUFSIZE]):
                self.close(c)
            return
        if c.data:
            k = len(c.tail)
            self.buf[:k] = c.tail
            try:
                n = c.sock.recv_into(self.view[k:k + BUFSIZE])
            except (BlockingIOError, InterruptedError):
                return
            if not n:
                self.close(c)  # the transaction is lost, as with any server
                return
            rest = self.scan(c, k, k + n)
            if rest is None:
                return
            c.inbuf += rest
        else:
            try:
                n = c.sock.recv_into(self.view[:BUFSIZE])
            except (BlockingIOError, InterruptedError):
                return
            if not n:
                self.close(c)
                return
            c.inbuf += self.view[:n]
        self.commands(c)
        self.flush(c)

    def scan(self, c: Conn, k: int, end: int) -> bytes | None:
        """DATA bytes in buf[k:end] (buf[:k] holds the tail of the previous read).  None while
        the terminator is still to come, else the bytes after it (pipelined commands)."""
        i = find_end(self.buf, end)
        if i < 0:
            if c.body is not None:
                c.body.feed(bytes(self.view[k:end]))
            c.tail = bytes(self.view[max(0, end - 4):end])
            return None
        t = time.monotonic()
        rest = bytes(self.view[i + 5:end])
        extra = ""
        if c.body is not None:
            c.body.finish(bytes(self.view[k:max(k, i + 2)]), max(0, k - (i + 2)))
            extra = f" size={c.body.size} sha256={c.body.sha.hexdigest()}"
        self.mesg += 1
        self.report(c.rcpts, t, extra)
        c.out += b"250 2.0.0 Ok: queued as fastsink\r\n"
        c.data, c.tail, c.body, c.mail, c.rcpts = False, b"", None, False, 0
        return rest

    def commands(self, c: Conn) -> None:
        """Serve every complete command line in c.inbuf (replies collect in c.out)."""
        while not c.data and not c.closing:
            j = c.inbuf.find(b"\n")
            if j < 0:
                if len(c.inbuf) > MAX_LINE:
                    c.out += b"500 5.5.0 line too long\r\n"
                    c.closing = True
                return
            line = bytes(c.inbuf[:j]).rstrip(b"\r")
            del c.inbuf[:j + 1]
            self.command(c, line)
            if c.data and c.inbuf:  # body bytes that came with DATA (a client that did
                rest = bytes(c.inbuf)  # not wait for 354): scan them as data
                c.inbuf.clear()
                for pos in range(0, len(rest), BUFSIZE):
                    chunk = rest[pos:pos + BUFSIZE]
                    k = len(c.tail)
                    self.buf[:k] = c.tail
                    self.buf[k:k + len(chunk)] = chunk
                    after = self.scan(c, k, k + len(chunk))
                    if after is not None:
                        c.inbuf += after + rest[pos + BUFSIZE:]
                        break

    def command(self, c: Conn, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].upper()
        if verb in (b"EHLO", b"LHLO"):
            c.mail, c.rcpts = False, 0
            c.out += self.ehlo
        elif verb == b"HELO":
            c.mail, c.rcpts = False, 0
            c.out += b"250 fastsink\r\n"
        elif verb == b"MAIL":
            if c.mail:
                c.out += b"503 5.5.1 Error: nested MAIL command\r\n"
            elif not line[5:].upper().startswith(b"FROM:"):
                c.out += b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
            else:
                c.mail, c.rcpts = True, 0
                c.out += b"250 2.1.0 Ok\r\n"
        elif verb == b"RCPT":
            if not c.mail:
                c.out += b"503 5.5.1 Error: need MAIL command\r\n"
            elif not line[5:].upper().startswith(b"TO:"):
                c.out += b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
            else:
                c.rcpts += 1
                c.out += b"250 2.1.5 Ok\r\n"
        elif verb == b"DATA":
            if not c.rcpts:
                c.out += (b"503 5.5.1 Error: need RCPT command\r\n" if not c.mail else
                          b"554 5.5.1 Error: no valid recipients\r\n")
            else:
                c.data, c.tail = True, b"\r\n"  # the CRLF of "DATA" may begin the terminator
                c.body = Body() if self.verify else None
                c.out += b"354 End data with <CR><LF>.<CR><LF>\r\n"
        elif verb == b"RSET":
            c.mail, c.rcpts = False, 0
            c.out += b"250 2.0.0 Ok\r\n"
        elif verb == b"NOOP":
            c.out += b"250 2.0.0 Ok\r\n"
        elif verb == b"VRFY":
            c.out += b"252 2.0.0 Send mail, I will try my best\r\n"
        elif verb == b"QUIT":
            self.quit += 1
            c.out += b"221 2.0.0 Bye\r\n"
            c.closing = True
        else:
            c.out += b"502 5.5.2 Error: command not recognized\r\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("address", help="host:port to listen on (port 0: any free port)")
    ap.add_argument("--verify", action="store_true",
                    help="hash every message body (slower; for byte checks, not timing)")
    ap.add_argument("--no-size", action="store_true",
                    help="do not advertise SIZE (a client that sends SIZE= may first have to "
                         "count the message's lines)")
    args = ap.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    sink = Sink(host.strip("[]") or "127.0.0.1", int(port), args.verify, not args.no_size)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stderr.write(f"fastsink listening on {host}:{sink.port()}\n")
    sys.stderr.flush()
    sink.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
