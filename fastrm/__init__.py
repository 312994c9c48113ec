"""fastrm: fast, complete reward-model training for torchtune."""

__version__ = "0.1.0"
