"""Numbers given as options or KWS_* variables: parsed, checked, and refused in words that say
what the value must be. The command line and the server's environment share them."""

from __future__ import annotations

import argparse
import os
import re


def parsed(text: str, kind: type, valid, expected: str):
    """``text`` as a ``kind`` (int or float) for which ``valid`` holds, else an ArgumentTypeError
    saying what was ``expected``: argparse would name the type function for a plain ValueError."""
    try:  # ASCII only: int and float read other scripts' digits ("١" is 1), which no one means
        value = kind(text) if text.isascii() else None
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
    return value + 0 if kind is float else value  # "-0" would be kept, and shown, as -0.0


def share(text: str) -> float:
    return parsed(text, float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def positive_int(text: str) -> int:
    return parsed(text, int, lambda v: v >= 1, "a whole number, at least 1")


def seed(text: str) -> int:
    return parsed(text, int, lambda v: 0 <= v < 2**32, f"a whole number from 0 to {2**32 - 1}")


def per_hour(text: str) -> float:
    return parsed(
        text, float, lambda v: 0 <= v < float("inf"), "a number of false accepts per hour, 0 or more"
    )


def average_ms(text: str) -> float:
    from kws.stream import CLIP_MS  # DetectionConfig's limit, said here as an option's error

    return parsed(
        text, float, lambda v: 0 < v <= CLIP_MS, f"a number of milliseconds above 0, at most {CLIP_MS:g}"
    )


def seconds(text: str) -> float:
    return parsed(text, float, lambda v: 0 < v < float("inf"), "a positive number of seconds")


def hop_ms(text: str) -> float:
    from kws.stream import CLIP_MS, HOP_MS  # DetectionConfig's limits, said here as an option's error

    return parsed(
        text,
        float,
        lambda v: 0 < v <= CLIP_MS and v % HOP_MS == 0,
        f"a multiple of the {HOP_MS:g} ms frame hop, at most {CLIP_MS:g} (the model's window)",
    )


def port(text: str) -> int:
    # uvicorn would listen on a larger number modulo 65536
    return parsed(text, int, lambda v: 1 <= v <= 65535, "from 1 to 65535")


def origins(text: str) -> tuple[str, ...]:
    """Comma-separated web origins (scheme://host[:port]), or *; written as a browser sends them
    (lower case, no default port), which is how they are compared."""
    found = []
    for part in (part.strip().rstrip("/") for part in text.split(",") if part.strip()):
        match = re.fullmatch(r"(https?)://([^/\s?#:]+|\[[0-9a-fA-F:.]+\])(?::(\d+))?", part, re.IGNORECASE)
        if part != "*" and not match:
            raise argparse.ArgumentTypeError(
                f"must be origins such as http://homeassistant.local:8123 (scheme://host[:port], no "
                f"path), or *, got {part!r}"
            )
        if match:
            scheme, host, port = match[1].lower(), match[2].lower(), match[3]
            default = {"http": "80", "https": "443"}[scheme]
            part = f"{scheme}://{host}" + (f":{port}" if port and port != default else "")
        found.append(part)
    return tuple(dict.fromkeys(found))


def score(text: str) -> float:
    return parsed(text, float, lambda v: 0 < v <= 1, "a score in (0, 1]")


def threshold(text: str) -> float | dict[str, float]:
    """One threshold for every keyword ("0.9"), or some keywords' own ("stop=0.99,go=0.95"),
    the others keeping the model's."""
    if "=" not in text:
        return score(text)
    chosen = {}
    for item in text.split(","):
        word, _, value = (part.strip() for part in item.partition("="))
        if not word or not value:
            raise argparse.ArgumentTypeError(
                f"must be a score or KEYWORD=SCORE pairs (stop=0.99,go=0.95), got {text}"
            )
        if word in chosen:
            raise argparse.ArgumentTypeError(f"gives {word} twice, in {text}: give each keyword once")
        chosen[word] = score(value)
    return chosen


def from_env(name: str, parse):
    """The variable ``name`` parsed as its option is, None where it is unset or empty; ValueError
    naming the variable where it is malformed."""
    text = os.environ.get(name)
    if not text:
        return None
    try:
        return parse(text)
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"{name} {error}") from None
