"""On/off settings read from environment variables, where a typo must not pass silently.

``QWENKIT_KERNELS=toch`` used to mean "the kernels", exactly as if it were unset: the user who meant the
plain path never learned it was ignored. A value outside the known ones is named once on stderr, with
the setting used instead.
"""

from __future__ import annotations

import os
import sys

_named: set[tuple[str, str]] = set()  # (variable, value) pairs already named on stderr


def env_choice(name: str, choices: dict[str, str], default: str) -> str:
    """The choice ``choices[value]`` for the variable's value (stripped, lower case; unset or empty
    gives ``default``). Any other value gives ``default`` after one line on stderr per process."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in choices:
        return choices[value]
    if (name, value) not in _named:
        _named.add((name, value))
        known = ", ".join(sorted(choices))
        print(f"qwenkit: {name}={value!r} is not one of {known}; using {default!r}", file=sys.stderr)
    return default


# An on/off switch in any of the usual spellings.
ON_OFF = dict.fromkeys(("1", "on", "true", "yes"), "on") | dict.fromkeys(("0", "off", "false", "no"), "off")
