"""fleet: what runs where on a small fleet of servers, and making it so."""

__version__ = "0.1.0"
