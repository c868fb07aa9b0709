"""Run a command under a pseudo-terminal of COLS x ROWS for SECONDS, then stop it (SIGINT, then SIGKILL), and save
what the screen showed every FRAME_EVERY seconds as plain-text frames (a tiny emulator: enough of VT100 for rich's
Live region: CR, LF, cursor up, erase line; colours dropped).

    python docs/screens/capture.py OUT_PREFIX COLS SECONDS FRAME_EVERY -- allconv search ...
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")


class Screen:
    """Lines of text and a cursor; the scrollback is kept (a frame is the last ROWS lines)."""

    def __init__(self, cols: int = 10_000) -> None:
        self.lines: list[str] = [""]
        self.row = self.col = 0
        self.cols = cols

    def put(self, text: str) -> None:
        while self.col + len(text) > self.cols:  # the terminal wraps a long line at its edge
            room = self.cols - self.col
            self.put(text[:room])
            self.text("\n")
            text = text[room:]
        line = self.lines[self.row]
        line = line.ljust(self.col)
        self.lines[self.row] = line[: self.col] + text + line[self.col + len(text):]
        self.col += len(text)

    def feed(self, data: str) -> None:
        pos = 0
        for m in CSI.finditer(data):
            self.text(data[pos:m.start()])
            pos = m.end()
            arg, cmd = m.group(1), m.group(2)
            if cmd == "A":
                self.row = max(0, self.row - int(arg or 1))
            elif cmd == "K":
                self.lines[self.row] = self.lines[self.row][: self.col] if arg in ("", "0") else ""
            elif cmd == "G":
                self.col = int(arg or 1) - 1
        self.text(data[pos:])

    def text(self, data: str) -> None:
        for part in re.split(r"(\r|\n)", data):
            if part == "\r":
                self.col = 0
            elif part == "\n":
                self.row += 1
                self.col = 0
                if self.row == len(self.lines):
                    self.lines.append("")
            elif part:
                self.put(part)

    def frame(self, rows: int) -> str:
        return "\n".join(line.rstrip() for line in self.lines[-rows:]).rstrip() + "\n"


def _read(master: int) -> bytes | None:
    """What the pseudo-terminal printed in the last 0.2 s (b"" if nothing); None once the command closed it."""
    ready, _, _ = select.select([master], [], [], 0.2)
    if not ready:
        return b""
    try:
        return os.read(master, 65536) or None
    except OSError:
        return None


def main() -> None:
    out, cols, seconds, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    cmd = sys.argv[sys.argv.index("--") + 1:]
    rows = 40
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    screen, raw = Screen(cols), bytearray()
    start = next_frame = time.monotonic()
    frame = 0
    while True:
        now = time.monotonic()
        if now >= next_frame:
            with open(f"{out}-{frame:02d}-{now - start:05.0f}s.txt", "w") as f:
                f.write(screen.frame(rows))
            frame += 1
            next_frame += every
        if now - start > seconds:
            os.killpg(proc.pid, signal.SIGINT)
            break
        chunk = _read(master)
        if chunk is None:
            break
        raw += chunk
        screen.feed(chunk.decode("utf-8", errors="replace"))
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        chunk = _read(master)
        if chunk is None:
            break
        raw += chunk
        screen.feed(chunk.decode("utf-8", errors="replace"))
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    with open(f"{out}-final.txt", "w") as f:
        f.write(screen.frame(rows))
    with open(f"{out}-raw.bin", "wb") as f:
        f.write(bytes(raw))
    print(f"exit {proc.wait()}, {frame} frames")


if __name__ == "__main__":
    main()
