"""rooftop-pv: rooftop PV potential of public and industrial buildings by district."""

__version__ = "0.1.0"
