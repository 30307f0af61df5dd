"""PF_KEY tests: codec, ctypes mirrors of the C headers."""
