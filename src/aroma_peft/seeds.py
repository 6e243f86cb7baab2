"""Seeds derived from integers: the same on every process and in every run."""


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of integers (same on every process, every run)."""
    h = 1469598103934665603
    for part in parts:
        h = ((h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 64)
    return h % (1 << 63)
