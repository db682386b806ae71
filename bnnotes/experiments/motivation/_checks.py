"""Argument checks shared by the motivation chapter's experiments (public names, for its sibling modules)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PLAIN_AND_BN", "check_norms", "check_seeds", "check_target", "check_positive"]

#: The two networks every experiment of the chapter compares: plain, and with BN.
PLAIN_AND_BN: tuple[str, str] = ("none", "bn")


def check_norms(norms: Sequence[str]) -> tuple[str, ...]:
    """`norms` as a tuple, if it is a non-empty subset of `PLAIN_AND_BN`; a ValueError otherwise.

    >>> check_norms(["bn"])
    ('bn',)
    """
    norms = tuple(norms)
    unknown = [n for n in norms if n not in PLAIN_AND_BN]
    if not norms or unknown:
        raise ValueError(f"norms must be a non-empty subset of {PLAIN_AND_BN} (plain, with BN), got {norms!r}")
    return norms


def check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    """`seeds` as a tuple, if it is a non-empty sequence of ints; a TypeError otherwise."""
    seeds = tuple(seeds)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise TypeError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    return seeds


def check_target(target: float) -> None:
    """A ValueError unless `target` is a test accuracy in (0, 1]."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a test accuracy in (0, 1], got {target!r}")


def check_positive(**values: float) -> None:
    """A ValueError naming the first of `values` (name=value) that is not positive."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
