"""Random hex digits for identifiers made on every request (request ids, reservation ids)."""

from __future__ import annotations

import os
import secrets


class _RandomHex:
    """Hex digits from the OS's CSPRNG, read a few KB at a time: one system call per few hundred
    identifiers instead of one each (py-spy: ~2% of a request's CPU). The buffer is dropped in a
    forked child, so worker processes never share digits."""

    CHUNK = 4096

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._hex, self._at = "", 0

    def take(self, digits: int) -> str:
        at = self._at
        if at + digits > len(self._hex):
            self._hex, at = secrets.token_hex(self.CHUNK), 0
        self._at = at + digits
        return self._hex[at : at + digits]


random_hex = _RandomHex().take
