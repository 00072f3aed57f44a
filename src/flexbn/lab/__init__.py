"""Built-in experiments (``flexbn lab``)."""

from __future__ import annotations


def run(seed: int = 2809) -> int:
    from . import origin

    return origin.main(seed=seed)
