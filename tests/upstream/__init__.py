"""procpool under its hosts' released code: session-buddy 0.23.0 and Mahavishnu 0.14.0 (scripts/upstream-check)."""
