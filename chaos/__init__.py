"""Fault injection against the running system, with money and orders checked afterwards:
`just chaos` (`python -m chaos`). See chaos/schedule.py for the faults, chaos/invariants.py for
what must hold once they have healed."""
