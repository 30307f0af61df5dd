"""The namespace harness of the tests: userspace_ipsec.lab, under the name the tests use."""

from userspace_ipsec.lab import *  # noqa: F403
from userspace_ipsec.lab import (  # noqa: F401  (private names some tests reach for)
    PREFIX,
    _run,
    _stop,
)
