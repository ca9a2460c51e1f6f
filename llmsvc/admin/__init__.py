"""The admin API: operator actions behind a bearer token."""
