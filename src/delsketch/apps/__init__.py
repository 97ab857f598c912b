"""Applications on the library: the command line, the demo, the paper reproduction, plots."""
