"""userspace-ipsec: the emulated kernel (SAD, SPD, PF_KEYv2), configuration, CLI and daemon."""
