"""tether.align — align FROZEN unimodal encoders with small trained projectors.

Flow: encoders → features → projectors → loss → train → eval.
"""

__version__ = "0.1.0"
