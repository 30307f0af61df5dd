"""ike: the IKEv2 daemon, a PF_KEY client like racoon."""
