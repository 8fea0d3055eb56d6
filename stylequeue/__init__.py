"""stylequeue."""
