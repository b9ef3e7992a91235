"""treadle: run other people's code safely on a fleet of machines."""

__version__ = "0.1.0"
__all__ = ["__version__"]
