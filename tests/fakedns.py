"""A DNS server on 127.0.0.1:53 that answers every name with fixed addresses.

    python -m tests.fakedns IPV4 IPV6 -- COMMAND...

It runs COMMAND while it serves, and exits with COMMAND's status. Run it in a
network namespace of its own (`bwrap --unshare-net`): it stands for a network
whose DNS says something else than /etc/hosts.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import dns.message
import dns.rdatatype
import dns.rrset


def serve(sock: socket.socket, answers: dict[dns.rdatatype.RdataType, str]) -> None:
    while True:
        data, peer = sock.recvfrom(4096)
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        for question in query.question:
            if question.rdtype in answers:
                rrset = dns.rrset.from_text(
                    question.name, 60, "IN", question.rdtype, answers[question.rdtype]
                )
                reply.answer.append(rrset)
        sock.sendto(reply.to_wire(), peer)


def main(argv: list[str]) -> int:
    ipv4, ipv6, separator, *command = argv
    assert separator == "--" and command, __doc__
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    answers = {dns.rdatatype.A: ipv4, dns.rdatatype.AAAA: ipv6}
    threading.Thread(target=serve, args=(sock, answers), daemon=True).start()
    return subprocess.run(command, check=False, timeout=120).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
