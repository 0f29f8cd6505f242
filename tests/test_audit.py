"""The secrets audit can fail: it finds a private key however the key's text or value
would leak, and tells one key from another."""

from __future__ import annotations

import base64

import asyncssh

from .audit import leaks, private_key_needles


def _pem() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()


def test_needles_are_the_private_part_not_the_shared_header():
    a, b = _pem(), _pem()
    na, nb = private_key_needles(a), private_key_needles(b)
    assert na and nb
    # no needle of one key is in the other key's text: the header lines are left out
    assert leaks(na, [b]) == [] and leaks(nb, [a]) == []
    header = a.splitlines()[1]
    assert header == b.splitlines()[1] and header not in na


def test_a_leaked_key_is_found_in_every_form():
    pem = _pem()
    needles = private_key_needles(pem)
    seed = asyncssh.import_private_key(pem)._key.private_value
    leaked = [
        f"DEBUG writing tunnel key:\n{pem}",  # the file's text in a log
        pem.splitlines()[4],  # one line of it
        f"argv: python -c key={seed.hex()}",  # the private value in hex
        "x" + base64.b64encode(seed).decode() + "x",  # ... and in base64
    ]
    for text in leaked:
        assert leaks(needles, [text]), text
    assert leaks(needles, ["an ordinary log line", _pem()]) == []
