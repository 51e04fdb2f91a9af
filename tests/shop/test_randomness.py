"""Buffered random hex digits (request and reservation ids)."""

from __future__ import annotations

import os

from shop.randomness import random_hex


def test_a_forked_worker_does_not_repeat_its_parents_digits():
    """Worker processes are forked after start-up: a buffer they inherited would hand out the
    same digits (the same ids) in every worker."""
    random_hex(16)  # the parent has a buffer now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next digits, to the parent
        os.write(write, random_hex(16).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 16 and int(child, 16) >= 0
    assert child != random_hex(16)


def test_digits_are_hex_and_do_not_repeat():
    taken = [random_hex(16) for _ in range(2000)]  # spans several refills
    assert all(len(t) == 16 and int(t, 16) >= 0 for t in taken)
    assert len(set(taken)) == len(taken)
