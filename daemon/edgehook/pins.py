"""Pin names as gpiozero reads them, checked against a Raspberry Pi's 40-pin header.

`edgehook check` must refuse what `edgehook run` would refuse, so the names come from
gpiozero's own board data rather than from a list of ours: every 40-pin Pi (3B, 4B,
5, Zero 2 W) has the same J8 header, and gpiozero's data for it says which names
(17, "17", GPIO17, BCM17, BOARD11, J8:11, WPI0) mean which pin and which of the pins
are GPIOs at all. gpiozero is imported on first use: commands that never look at
pins do not pay for it.
"""

from __future__ import annotations

import difflib
import re
import warnings
from functools import lru_cache
from typing import Any

# A Pi 4B; its J8 header is the 40-pin header all current boards share.
BOARD_REVISION = 0xC03112
HEADER = "J8"
_PHYSICAL = re.compile(r"^(?:PIN|P|PHYS|PHYSICAL|HEADER)[ _-]*(\d+)$")


@lru_cache(maxsize=1)
def _header() -> tuple[dict[Any, str], dict[int, str]]:
    """(every name gpiozero accepts -> GPIO name, physical number -> what the pin is)."""
    from gpiozero.pins.pi import PiBoardInfo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        board = PiBoardInfo.from_revision(BOARD_REVISION)
    gpio_names: dict[Any, str] = {}
    physical: dict[int, str] = {}
    for number, pin in board.headers[HEADER].pins.items():
        physical[number] = pin.name
        if "gpio" in pin.interfaces:
            for name in pin.names:
                gpio_names[name] = pin.name
    return gpio_names, physical


def canonical_pin(value: int | str) -> str:
    """The GPIO name of a pin as gpiozero reads it (`BOARD11` -> `GPIO17`).

    Raises ValueError saying why gpiozero would refuse it, with a suggestion when one
    is plain (`gpio17`, `GPIO 17` and `pin11` are near misses of real names).
    """
    names, physical = _header()
    if value in names:
        return names[value]
    text = str(value)
    squeezed = re.sub(r"\s+", "", text).upper()
    if isinstance(value, int) or text.strip().isdigit():
        return _refuse(f"{text} is not a GPIO number of the 40-pin header (0 to 27)")
    if squeezed in names and squeezed != text:
        return _refuse(f"{text!r} is not a pin name gpiozero reads: its names are exact, "
                       "upper case and without spaces", squeezed)
    m = _PHYSICAL.match(squeezed)
    if m:
        number = int(m.group(1))
        board = f"BOARD{number}"
        if board in names:
            return _refuse(f"{text!r} is not a pin name gpiozero reads", board,
                           f" (physical pin {number}, {names[board]})")
    m = re.match(r"^(?:BOARD|J8:)(\d+)$", squeezed)
    if m and int(m.group(1)) in physical:
        what = physical[int(m.group(1))]
        return _refuse(f"{text} is physical pin {m.group(1)}, which is {what}, not a GPIO")
    m = re.match(r"^(?:GPIO|BCM)(\d+)$", squeezed)
    if m:
        return _refuse(f"{text} is not on the 40-pin header (GPIO0 to GPIO27)")
    close = difflib.get_close_matches(squeezed, [n for n in names if isinstance(n, str)],
                                      n=1, cutoff=0.75)
    return _refuse(f"{text!r} is not a pin name gpiozero reads (write e.g. 17, GPIO17, "
                   f"BCM17, BOARD11 or J8:11)", close[0] if close else None)


def _refuse(msg: str, suggestion: str | None = None, note: str = "") -> str:
    if suggestion:
        msg += f" (did you mean {suggestion!r}{note}?)"
    raise ValueError(msg)
