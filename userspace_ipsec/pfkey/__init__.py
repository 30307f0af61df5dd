"""PF_KEYv2 (RFC 2367) constants, messages and wire codec, with the Linux/KAME extensions."""
