"""Stop strings: where generated text must end (OpenAI's `stop`). Pure Python: the serving engine
(`qwen2vl_jax.engine`) stops a sequence when its text reaches one, the server cuts the answer there."""

from __future__ import annotations

__all__ = ["StopMatcher", "cut_at_stop"]


class StopMatcher:
    """Finds stop strings in text that arrives piece by piece, in time linear in the text (one Knuth-Morris-Pratt
    automaton per stop string: each character advances every automaton by amortised O(1)), never rescanning.

    `feed(piece)` returns the part of the text that is now certain to come before any stop string and can be sent;
    the tail that may still be the start of a stop string is held back. Once a stop string is complete, `.stopped`
    is True and nothing more is returned: the text ends before the stop string that completed first (ties: the one
    that started first); OpenAI leaves the stop string out. `flush()` returns the held-back tail at the end."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # characters of each stop matched at the end of the text so far
        self.text: list[str] = []  # characters not yet returned
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        for ch in piece:
            self.text.append(ch)
            best = None
            for k, stop in enumerate(self.stops):
                j = self.state[k]
                while j and stop[j] != ch:
                    j = self.fail[k][j - 1]
                j = j + 1 if stop[j] == ch else 0
                if j == len(stop):
                    start = len(self.text) - j
                    best = start if best is None else min(best, start)
                    j = self.fail[k][j - 1]
                self.state[k] = j
            if best is not None:
                out = "".join(self.text[:best])
                self.text, self.stopped = [], True
                return out
        hold = max(self.state)  # the longest stop prefix the text ends with
        out = "".join(self.text[:len(self.text) - hold])
        self.text = self.text[len(self.text) - hold:]
        return out

    def flush(self) -> str:
        out = "" if self.stopped else "".join(self.text)
        self.text = []
        return out


def _failure(stop: str) -> list[int]:
    """KMP's failure function: fail[i] = length of the longest proper prefix of stop[:i + 1] that is also its
    suffix."""
    fail, j = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while j and stop[i] != stop[j]:
            j = fail[j - 1]
        if stop[i] == stop[j]:
            j += 1
        fail[i] = j
    return fail


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string (as `StopMatcher` finds it in a stream, so a streamed and a whole
    answer end at the same place), and whether one was found."""
    matcher = StopMatcher(stops)
    out = matcher.feed(text)
    return (out, True) if matcher.stopped else (text, False)

