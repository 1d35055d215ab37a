"""How fast the delay relay of ``shoal bench comm --delay`` carries one TCP stream.

    sudo .venv/bin/python bench/relay_ceiling.py --rate none --delay 0.5ms --mb 400
    sudo .venv/bin/python bench/relay_ceiling.py --rate 100mbit --delay 50ms --mb 100

Two namespace hosts joined by TUN devices and shoal's relay (:mod:`shoal.netns`),
the link capped with ``tbf`` at ``--rate``: host 0 sends ``--mb`` MB to host 1
over one TCP connection, and the rate it reached is printed (slow start included,
as a collective's transfer would meet it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from shoal import netns

RECEIVE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1)
c, _ = s.accept(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    n += len(d)
print(n)
"""

SEND = """
import socket, sys
s = socket.create_connection((sys.argv[1], 5001)); buf = b"x" * (1 << 20)
for _ in range(int(sys.argv[2])):
    s.sendall(buf)
s.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="none", help="link cap, as 100mbit (none: uncapped)")
    ap.add_argument("--delay", default="50ms", help="one-way delay, as 50ms")
    ap.add_argument("--mb", type=int, default=100, help="MB (2^20 bytes) to send")
    a = ap.parse_args()
    with netns.hosts(2, a.rate, delay=netns.parse_delay(a.delay)) as (src, dst):
        receiver = subprocess.Popen(
            [*dst.prefix(), sys.executable, "-c", RECEIVE, dst.addr],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        t0 = time.perf_counter()
        subprocess.run([*src.prefix(), sys.executable, "-c", SEND, dst.addr, str(a.mb)], check=True)
        got = int(receiver.communicate(timeout=600)[0])
        seconds = time.perf_counter() - t0
    print(
        f"rate {a.rate}, delay {a.delay}: {got / 2**20:.0f} MB in {seconds:.2f} s = "
        f"{got * 8 / seconds / 1e6:.0f} Mbit/s"
    )


if __name__ == "__main__":
    main()
