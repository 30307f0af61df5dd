"""datapath: TUN device, ESP transform, UDP encapsulation, the packet loop."""
