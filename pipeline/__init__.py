"""The `ecgtok` command line, its Beam options, and the job graph."""

__version__ = "0.1.0"
