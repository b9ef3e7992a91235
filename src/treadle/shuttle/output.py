"""Turning a program's output bytes into protocol text chunks."""

from __future__ import annotations

import codecs

from treadle.shuttle.runtimes.base import Stream

__all__ = ["CHUNK_MAX_CHARS", "OutputDecoder"]

CHUNK_MAX_CHARS = 64 * 1024


class OutputDecoder:
    """UTF-8 decoding with one incremental decoder per stream, so a character split across
    two reads arrives whole; invalid bytes become U+FFFD. Pieces are at most
    CHUNK_MAX_CHARS characters long."""

    def __init__(self) -> None:
        self._decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }

    def feed(self, stream: Stream, data: bytes) -> list[str]:
        return _split(self._decoders[stream].decode(data))

    def finish(self) -> list[tuple[Stream, str]]:
        """What is left at the end: a truncated character comes out as U+FFFD."""
        rest: list[tuple[Stream, str]] = []
        for stream in ("stdout", "stderr"):
            rest.extend((stream, text) for text in _split(self._decoders[stream].decode(b"", True)))
        return rest


def _split(text: str) -> list[str]:
    if len(text) <= CHUNK_MAX_CHARS:
        return [text] if text else []
    return [text[i : i + CHUNK_MAX_CHARS] for i in range(0, len(text), CHUNK_MAX_CHARS)]
