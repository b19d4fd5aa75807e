"""Output sizes: the aspect-ratio presets and the ``WxH`` size syntax."""

from __future__ import annotations

import re

# The 1-megapixel sizes the Z-Image authors' demo offers for these ratios, as (width, height).
ASPECT_RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
    "16:9": (1280, 720),
    "9:16": (720, 1280),
}

# Plain ASCII digits only: str.isdigit() and \d also accept other scripts' digits, which int() would
# then quietly convert.
_SIZE_RE = re.compile(r"([0-9]+)[xX]([0-9]+)")


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WxH"`` (``x`` in either case, surrounding whitespace ignored) into ``(width, height)``.

    Only the syntax and positivity are checked; limits and multiples of 16 are the caller's policy.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. '1024x1024'")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid size {text!r}: width and height must be positive")
    return width, height
